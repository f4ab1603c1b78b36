-- Shared by every registry script (prepended in Rust). A client ID's hash `cg:id:{id}` holds:
-- node, epoch, token (SHA-256 of the resume token, hex), live (1|0), phase
-- (idle|calling|called|incall), peer (decimal ID, '' when idle), held_bytes (bytes in cg:held:{id}).
-- A live ID may also hold its home's delivery record (hw, hw_at, hw_peer, hw_pe: refresh.lua) and
-- in_at, when a message was last on its way to it (locate.lua, transition.lua): see resume.lua.
-- Key names are built only from decimal IDs that the registry itself wrote or that Rust parsed
-- into a u64; nothing a client typed reaches a key name.
local function id_key(id)
  return 'cg:id:' .. id
end

-- What the peer's phase must be when mine is `phase`.
local MIRROR = { idle = 'idle', calling = 'called', called = 'calling', incall = 'incall' }

-- A live binding: the ID's hash exists, has this epoch and a connection holds it.
local function holds_live(key, epoch)
  local e, live = unpack(redis.call('HMGET', key, 'epoch', 'live'))
  return e == epoch and live == '1'
end

-- Sets my phase to `phase` with `peer`, and the peer's to the mirror if it still points at me
-- (a peer whose key expired by TTL, or that moved on, is left alone: it is not in this call).
local function set_pair(my_key, me, phase, peer)
  if phase == 'idle' then
    redis.call('HSET', my_key, 'phase', 'idle', 'peer', '')
  else
    redis.call('HSET', my_key, 'phase', phase, 'peer', peer)
  end
  if peer ~= '' then
    local peer_key = id_key(peer)
    if redis.call('HGET', peer_key, 'peer') == me then
      if phase == 'idle' then
        redis.call('HSET', peer_key, 'phase', 'idle', 'peer', '')
      else
        redis.call('HSET', peer_key, 'phase', MIRROR[phase], 'peer', me)
      end
    end
  end
end

-- Deletes the ID and resets its call peer; returns the peer whose call was reset, or ''.
local function free(key, me)
  local phase, peer = unpack(redis.call('HMGET', key, 'phase', 'peer'))
  redis.call('DEL', key)
  if phase ~= 'idle' and peer and peer ~= '' then
    local peer_key = id_key(peer)
    if redis.call('HGET', peer_key, 'peer') == me then
      redis.call('HSET', peer_key, 'phase', 'idle', 'peer', '')
      return peer
    end
  end
  return ''
end

-- Redis's clock, in milliseconds: the one clock every node's records can be compared on.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
