-- KEYS: cg:id:{me}, cg:id:{peer}
-- ARGV: epoch, transition, me, peer, op ('' for none), reserved ('1': my binding may be reserved,
-- for a reconcile ending what a connection that left during an outage started; '' otherwise)
-- Returns {1, new phase, new peer} or a refusal:
-- {0} stale, {2, phase, peer} already in a call, {3} unknown peer, {4} busy,
-- {5, phase, peer} wrong state (my current one), {6, phase, peer} outdated: an operation of this
-- node at least as new as `op` was applied to my ID already, or `op` was fenced (resolve.lua),
-- so this one must not run — it is a copy Redis received late.
-- An applied transition records `op` in my hash (field `op`): resolve.lua reads it to learn
-- whether a transition whose answer the node never got was applied.
local e, live, phase, peer, done = unpack(redis.call('HMGET', KEYS[1], 'epoch', 'live', 'phase', 'peer', 'op'))
if e ~= ARGV[1] or (live ~= '1' and ARGV[6] ~= '1') then
  return { 0 }
end
local t, me, other, op = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if op ~= '' and tonumber(done or '0') >= tonumber(op) then
  return { 6, phase, peer }
end
local function applied()
  if op ~= '' then
    redis.call('HSET', KEYS[1], 'op', op)
  end
end
if t == 'offer' then
  if phase ~= 'idle' then
    return { 2, phase, peer }
  end
  if me == other then
    return { 3 }
  end
  local their = redis.call('HGET', KEYS[2], 'phase')
  if not their then
    return { 3 }
  end
  if their ~= 'idle' then
    return { 4 }
  end
  redis.call('HSET', KEYS[1], 'phase', 'calling', 'peer', other)
  redis.call('HSET', KEYS[2], 'phase', 'called', 'peer', me)
  -- The callee is sent the offer (maybe by this very node, with no route read): see locate.lua.
  redis.call('HSET', KEYS[2], 'in_at', now_ms())
  applied()
  return { 1, 'calling', other }
end
local wanted
if t == 'accept' or t == 'decline' then
  wanted = 'called'
elseif t == 'cancel' then
  wanted = 'calling'
elseif t == 'hangup' then
  wanted = phase ~= 'idle' and phase or 'none'
else
  return redis.error_reply('unknown transition ' .. t)
end
if phase ~= wanted or peer ~= other then
  return { 5, phase, peer }
end
local new = t == 'accept' and 'incall' or 'idle'
set_pair(KEYS[1], me, new, other)
applied()
if new == 'idle' then
  return { 1, 'idle', '' }
end
return { 1, new, other }
