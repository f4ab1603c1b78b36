-- KEYS: cg:id:{id}...   ARGV: node, lease ms, epoch...
-- Renews the lease of each ID this node still holds live at that epoch; returns how many.
local renewed = 0
for i, key in ipairs(KEYS) do
  local node, e, live = unpack(redis.call('HMGET', key, 'node', 'epoch', 'live'))
  if node == ARGV[1] and e == ARGV[i + 2] and live == '1' then
    redis.call('PEXPIRE', key, ARGV[2])
    renewed = renewed + 1
  end
end
return renewed
