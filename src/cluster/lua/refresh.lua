-- KEYS: cg:id:{id}...   ARGV: node, lease ms, then two per ID: epoch, high-water ('' for none)
-- Renews the lease of each ID this node still holds live at that epoch. Returns one code per ID:
-- 1 renewed, 0 gone (no key: left, expired, or Redis lost its data — see restore.lua),
-- -1 held by someone else now (moved, or detached): this node's connection is stale.
-- A renewed ID given a high-water (the highest `seq` this node numbered for it, taken before this
-- script ran) gets a delivery record, for a resume elsewhere should this node die (resume.lua):
-- `hw` that number, `hw_at` Redis's time now (ms), `hw_peer` its call peer ('' when idle) and
-- `hw_pe` that peer's epoch — or no record at all when the peer is held by this very node, whose
-- messages to it reach no other node's eyes. Without a high-water any old record is deleted.
local out = {}
local at
for i, key in ipairs(KEYS) do
  local epoch, hw = ARGV[2 * i + 1], ARGV[2 * i + 2]
  local node, e, live, peer = unpack(redis.call('HMGET', key, 'node', 'epoch', 'live', 'peer'))
  if not e then
    out[i] = 0
  elseif node == ARGV[1] and e == epoch and live == '1' then
    redis.call('PEXPIRE', key, ARGV[2])
    local recorded = false
    if hw ~= '' then
      peer = peer or ''
      local pe = ''
      local local_peer = false
      if peer ~= '' then
        local p_node, p_epoch = unpack(redis.call('HMGET', id_key(peer), 'node', 'epoch'))
        local_peer = p_node == ARGV[1]
        pe = p_epoch or ''
      end
      if not local_peer then
        at = at or now_ms()
        redis.call('HSET', key, 'hw', hw, 'hw_at', at, 'hw_peer', peer, 'hw_pe', pe)
        recorded = true
      end
    end
    if not recorded then
      redis.call('HDEL', key, 'hw', 'hw_at', 'hw_peer', 'hw_pe')
    end
    out[i] = 1
  else
    out[i] = -1
  end
end
return out
