-- KEYS: cg:id:{id}, cg:epoch, cg:held:{id}   ARGV: node, token digest, lease ms
-- Returns the new epoch, or 0 if the ID is taken (the caller draws another).
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local epoch = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'epoch', epoch, 'token', ARGV[2], 'live', 1,
  'phase', 'idle', 'peer', '', 'held_bytes', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
-- Messages once held for an earlier owner of this number are not for the new one.
redis.call('DEL', KEYS[3])
return epoch
