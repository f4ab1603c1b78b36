-- KEYS: cg:id:{id}, cg:epoch, cg:held:{id}, cg:generation
-- ARGV: node, token digest, lease ms, a fresh random generation
-- Returns {new epoch, generation}, or {0} if the ID is taken (the caller draws another).
-- The generation names this Redis's data set: created by the first claim (or refresh) after Redis
-- starts empty, so a node can tell "Redis lost everything" from "my ID expired" (restore.lua).
if redis.call('EXISTS', KEYS[1]) == 1 then
  return { 0 }
end
redis.call('SET', KEYS[4], ARGV[4], 'NX')
local epoch = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'epoch', epoch, 'token', ARGV[2], 'live', 1,
  'phase', 'idle', 'peer', '', 'held_bytes', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
-- Messages once held for an earlier owner of this number are not for the new one.
redis.call('DEL', KEYS[3])
return { epoch, redis.call('GET', KEYS[4]) }
