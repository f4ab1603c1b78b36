-- KEYS: cg:id:{current}, cg:id:{target}, cg:epoch
-- ARGV: current epoch, offered token digest, new token digest, node, lease ms, quiet window ms
-- Returns {1, epoch, previous node, previous live, phase, peer, previous epoch, quiet through}
-- or {code}: -1 stale, -2 in call, -3 unknown (or own ID), -4 token mismatch. Same order of
-- checks as the memory directory, so both answer every case alike.
-- `quiet through` ('' when unknown) is the previous home's delivery record (refresh.lua), when it
-- still vouches for everything the ID was sent: the same call peer at the same epoch as then (so
-- every message to the ID came from another node), and no route to the ID read (`in_at`, see
-- locate.lua) nor offer made to it since `quiet window` before the record. A client that says
-- it processed that much then lost nothing if the previous home died.
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
local t = redis.call('HMGET', KEYS[2], 'token', 'node', 'live', 'phase', 'peer', 'epoch',
  'hw', 'hw_at', 'hw_peer', 'hw_pe', 'in_at')
if not t[1] then
  return { -3 }
end
if t[1] ~= ARGV[2] then
  return { -4 }
end
local quiet = ''
local hw, hw_at, hw_peer, hw_pe, in_at = t[7], t[8], t[9], t[10], t[11]
local peer = t[5] or ''
if hw and hw_at and hw_peer == peer then
  local same_peer = peer == ''
  if not same_peer then
    same_peer = redis.call('HGET', id_key(peer), 'epoch') == hw_pe
  end
  local since = tonumber(hw_at) - tonumber(ARGV[6])
  if same_peer and (not in_at or tonumber(in_at) < since) then
    quiet = hw
  end
end
redis.call('DEL', KEYS[1])
local epoch = redis.call('INCR', KEYS[3])
redis.call('HDEL', KEYS[2], 'hw', 'hw_at', 'hw_peer', 'hw_pe', 'in_at')
redis.call('HSET', KEYS[2], 'node', ARGV[4], 'epoch', epoch, 'token', ARGV[3], 'live', 1)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return { 1, epoch, t[2], t[3], t[4], t[5], t[6], quiet }
