-- KEYS: cg:id:{current}, cg:id:{target}, cg:epoch
-- ARGV: current epoch, offered token digest, new token digest, node, lease ms
-- Returns {1, epoch, previous node, previous live, phase, peer, previous epoch} or {code}:
-- -1 stale, -2 in call, -3 unknown (or own ID), -4 token mismatch. Same order of checks as the
-- memory directory, so both answer every case alike.
local e, live, phase = unpack(redis.call('HMGET', KEYS[1], 'epoch', 'live', 'phase'))
if e ~= ARGV[1] or live ~= '1' then
  return { -1 }
end
if KEYS[1] == KEYS[2] then
  return { -3 }
end
if phase ~= 'idle' then
  return { -2 }
end
local t = redis.call('HMGET', KEYS[2], 'token', 'node', 'live', 'phase', 'peer', 'epoch')
if not t[1] then
  return { -3 }
end
if t[1] ~= ARGV[2] then
  return { -4 }
end
redis.call('DEL', KEYS[1])
local epoch = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[2], 'node', ARGV[4], 'epoch', epoch, 'token', ARGV[3], 'live', 1)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return { 1, epoch, t[2], t[3], t[4], t[5], t[6] }
