-- KEYS: cg:id:{id}...   ARGV: node, lease ms, epoch...
-- Renews the lease of each ID this node still holds live at that epoch. Returns one code per ID:
-- 1 renewed, 0 gone (no key: left, expired, or Redis lost its data — see restore.lua),
-- -1 held by someone else now (moved, or detached): this node's connection is stale.
local out = {}
for i, key in ipairs(KEYS) do
  local node, e, live = unpack(redis.call('HMGET', key, 'node', 'epoch', 'live'))
  if not e then
    out[i] = 0
  elseif node == ARGV[1] and e == ARGV[i + 2] and live == '1' then
    redis.call('PEXPIRE', key, ARGV[2])
    out[i] = 1
  else
    out[i] = -1
  end
end
return out
