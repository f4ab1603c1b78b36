-- KEYS: cg:id:{id}..., cg:epoch (the last)
-- ARGV: node, lease ms, op, then five per ID: epoch, token digest, phase, peer, dirty (1|0)
-- Puts what a node knows of its live IDs back into Redis after Redis was unreachable:
-- - key missing (Redis restarted empty, or the lease ran out meanwhile): recreated live on this
--   node with the node's call state and resume token (digest); the epoch counter is raised past
--   it, so no epoch is given out twice;
-- - held by this node at that epoch: if dirty (the node decided a call change while Redis was
--   out) its call state is written; a token an earlier restore left empty is put back; if live,
--   its lease is renewed, else (reserved: its connection dropped meanwhile) it counts as lost;
-- - held by anyone else: left alone (this node's connection is stale).
-- A call state written over one another node made meanwhile (Redis was unreachable from this
-- node only): that other peer is reset to idle if it still points here, and returned, so its
-- client can be told. `op` is recorded, so a late copy of an older transition is refused.
-- A dirty call whose peer moved to another node meanwhile (resumed there before this write-back)
-- and is not in that call there is reset to idle, and the peer returned as broken.
-- Any delivery record of an ID held by this node is deleted (see refresh.lua).
-- Returns three entries per ID: code (2 restored, 1 renewed or written, -1 lost), the displaced
-- peer and the broken peer ('' if none).
-- A call this node decided whose peer has meanwhile moved to another node (resumed there before
-- this write-back) and is not in it there: the call cannot stand. Mine is reset; the peer is
-- returned so both clients can be told.
local function check_mirror(key, me, phase, peer)
  if peer == '' then
    return ''
  end
  local p_node, p_phase, p_peer = unpack(redis.call('HMGET', id_key(peer), 'node', 'phase', 'peer'))
  if p_node and p_node ~= ARGV[1] and (p_peer ~= me or p_phase ~= MIRROR[phase]) then
    redis.call('HSET', key, 'phase', 'idle', 'peer', '')
    return peer
  end
  return ''
end

local n = #KEYS - 1
local node, lease, op = ARGV[1], ARGV[2], ARGV[3]
local highest = 0
local out = {}
for i = 1, n do
  local a = 3 + (i - 1) * 5
  local epoch, token, phase, peer, dirty = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  local key = KEYS[i]
  local me = string.sub(key, 7)
  local h_node, h_epoch, h_live, h_token, h_peer = unpack(redis.call('HMGET', key, 'node', 'epoch', 'live', 'token', 'peer'))
  local code, displaced, broken = -1, '', ''
  if not h_epoch then
    redis.call('HSET', key, 'node', node, 'epoch', epoch, 'token', token, 'live', 1,
      'phase', phase, 'peer', peer, 'held_bytes', 0, 'op', op)
    redis.call('PEXPIRE', key, lease)
    if dirty == '1' then
      broken = check_mirror(key, me, phase, peer)
    end
    if tonumber(epoch) > highest then
      highest = tonumber(epoch)
    end
    code = 2
  elseif h_node == node and h_epoch == epoch then
    -- What the node numbered for it since its last delivery record may include notices this
    -- reconcile leads to (corrections), which no route read stamps: the record is void.
    redis.call('HDEL', key, 'hw', 'hw_at', 'hw_peer', 'hw_pe')
    if dirty == '1' or h_token == '' then
      if h_peer and h_peer ~= '' and h_peer ~= peer then
        local other = id_key(h_peer)
        if redis.call('HGET', other, 'peer') == me then
          redis.call('HSET', other, 'phase', 'idle', 'peer', '')
          displaced = h_peer
        end
      end
      redis.call('HSET', key, 'phase', phase, 'peer', peer, 'op', op)
      if dirty == '1' then
        broken = check_mirror(key, me, phase, peer)
      end
      if h_token == '' then
        redis.call('HSET', key, 'token', token)
      end
    end
    if h_live == '1' then
      redis.call('PEXPIRE', key, lease)
      code = 1
    end
  end
  out[3 * i - 2] = code
  out[3 * i - 1] = displaced
  out[3 * i] = broken
end
if highest > tonumber(redis.call('GET', KEYS[n + 1]) or 0) then
  redis.call('SET', KEYS[n + 1], highest)
end
return out
