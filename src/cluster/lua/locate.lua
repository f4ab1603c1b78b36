-- KEYS: cg:id:{id}   Returns {node, epoch, live}, or {} if no node holds the ID.
-- A route read to send to the ID: stamps `in_at` (Redis's time, ms) in its hash, so a resume
-- after its node died knows a message may have been on its way since (resume.lua). A node
-- reads a route at most once per route TTL while it keeps sending, so this is no write per
-- message.
local node, epoch, live = unpack(redis.call('HMGET', KEYS[1], 'node', 'epoch', 'live'))
if not node or not epoch or not live then
  return {}
end
redis.call('HSET', KEYS[1], 'in_at', now_ms())
return { node, epoch, live }
