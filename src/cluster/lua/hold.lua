-- KEYS: cg:id:{id}, cg:held:{id}
-- ARGV: epoch expected ('' for any), payload, max messages, max bytes, grace ms
-- Returns 1 held, 0 no such client, 2 moved (epoch differs: locate again), 3 too many messages,
-- 4 too many bytes. The caps are checked before XADD, so nothing already held is ever trimmed
-- away without its sender being told.
local e, held = unpack(redis.call('HMGET', KEYS[1], 'epoch', 'held_bytes'))
if not e then
  return 0
end
if ARGV[1] ~= '' and e ~= ARGV[1] then
  return 2
end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[3]) then
  return 3
end
local size = string.len(ARGV[2])
if (tonumber(held) or 0) + size > tonumber(ARGV[4]) then
  return 4
end
redis.call('XADD', KEYS[2], '*', 'm', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'held_bytes', size)
-- Live as long as the ID can still be resumed, and at least a grace period.
local ttl = math.max(tonumber(ARGV[5]), redis.call('PTTL', KEYS[1]))
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
