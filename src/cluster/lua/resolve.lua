-- KEYS: cg:id:{me}   ARGV: epoch, op
-- Makes the outcome of transition `op` certain after the node got no answer for it (Redis was
-- frozen or unreachable; it may still run the script it received, or may never have got it).
-- Returns {1, phase, peer}: it was applied; {2, phase, peer}: it was not, and now never will be
-- (`op` is recorded as done, so a late copy is refused as outdated); {0}: the binding is stale.
-- A reserved binding at that epoch counts: its connection left this node during the outage, and
-- only this node's detach can have reserved it (a resume elsewhere changes the epoch).
local e, phase, peer, done = unpack(redis.call('HMGET', KEYS[1], 'epoch', 'phase', 'peer', 'op'))
if e ~= ARGV[1] then
  return { 0 }
end
if tonumber(done or '0') >= tonumber(ARGV[2]) then
  return { 1, phase, peer }
end
redis.call('HSET', KEYS[1], 'op', ARGV[2])
return { 2, phase, peer }
