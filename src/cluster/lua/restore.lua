-- KEYS: cg:id:{id}..., cg:epoch (last)   ARGV: node, lease ms, epoch counter seen before, epoch...
-- Puts back the live IDs of this node that Redis lost (it restarted without persistence): only
-- when the epoch counter, read before, is below the ID's epoch — a counter that went backwards
-- is what a data loss looks like; a key gone while the counter is ahead left or expired for real.
-- A restored ID is idle (its call state is lost) and has no token (it cannot be resumed until
-- the client's next claim). The counter is raised past every restored epoch, so no epoch is ever
-- given out twice. Returns one code per ID: 1 restored, 0 not.
local n = #KEYS - 1
local seen = tonumber(ARGV[3])
local highest = 0
local out = {}
for i = 1, n do
  local epoch = tonumber(ARGV[i + 3])
  if seen < epoch and redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('HSET', KEYS[i], 'node', ARGV[1], 'epoch', ARGV[i + 3], 'token', '', 'live', 1,
      'phase', 'idle', 'peer', '', 'held_bytes', 0)
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    if epoch > highest then
      highest = epoch
    end
    out[i] = 1
  else
    out[i] = 0
  end
end
if highest > tonumber(redis.call('GET', KEYS[n + 1]) or 0) then
  redis.call('SET', KEYS[n + 1], highest)
end
return out
