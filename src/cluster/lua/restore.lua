-- KEYS: cg:id:{id}..., cg:epoch, cg:generation (the last two)
-- ARGV: node, lease ms, a fresh random generation, epoch...
-- Puts back the live IDs of this node that Redis lost: called only when the node saw the
-- generation change or vanish (Redis restarted without persistence). A restored ID is idle (its
-- call state is lost) and has no token (it cannot be resumed until the client's next claim). The
-- epoch counter is raised past every restored epoch, so no epoch is ever given out twice.
-- Returns {generation, code per ID...}: 1 restored, 0 not (someone else holds the number now).
local n = #KEYS - 2
local highest = 0
local out = {}
redis.call('SET', KEYS[n + 2], ARGV[3], 'NX')
out[1] = redis.call('GET', KEYS[n + 2])
for i = 1, n do
  local epoch = tonumber(ARGV[i + 3])
  if redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('HSET', KEYS[i], 'node', ARGV[1], 'epoch', ARGV[i + 3], 'token', '', 'live', 1,
      'phase', 'idle', 'peer', '', 'held_bytes', 0)
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    if epoch > highest then
      highest = epoch
    end
    out[i + 1] = 1
  else
    out[i + 1] = 0
  end
end
if highest > tonumber(redis.call('GET', KEYS[n + 1]) or 0) then
  redis.call('SET', KEYS[n + 1], highest)
end
return out
