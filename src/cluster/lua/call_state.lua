-- KEYS: cg:id:{id}   ARGV: epoch   Returns {1, phase, peer}, or {0} if stale.
local e, live, phase, peer = unpack(redis.call('HMGET', KEYS[1], 'epoch', 'live', 'phase', 'peer'))
if e ~= ARGV[1] or live ~= '1' then
  return { 0 }
end
return { 1, phase, peer }
