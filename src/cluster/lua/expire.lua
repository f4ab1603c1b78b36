-- KEYS: cg:id:{id}   ARGV: epoch, id
-- Frees the ID only if it is still reserved with that epoch (a resume anywhere wins).
-- Returns {1, peer reset or ''}, or {0}.
local e, live = unpack(redis.call('HMGET', KEYS[1], 'epoch', 'live'))
if e ~= ARGV[1] or live ~= '0' then
  return { 0 }
end
return { 1, free(KEYS[1], ARGV[2]) }
