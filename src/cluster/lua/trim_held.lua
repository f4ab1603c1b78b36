-- KEYS: cg:held:{id}, cg:id:{id}, cg:held:due   ARGV: last entry id delivered, id
-- Deletes the held entries up to and including ARGV[1] (read by read_held.lua and delivered);
-- entries held after the read stay, in order. Uses only XRANGE, DEL and XADD (re-adding the
-- few that stay), so the ACL of docs/SECURITY.md needs nothing more. Returns how many stay.
local entries = redis.call('XRANGE', KEYS[1], '-', '+')
local ttl = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
local kept, freed = 0, 0
local cut = ARGV[1]
local function after(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams > bms or (ams == bms and aseq > bseq)
end
for _, entry in ipairs(entries) do
  if after(entry[1], cut) then
    redis.call('XADD', KEYS[1], '*', 'm', entry[2][2])
    kept = kept + 1
  else
    freed = freed + string.len(entry[2][2])
  end
end
if kept > 0 then
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
else
  redis.call('ZREM', KEYS[3], ARGV[2])
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  local held = tonumber(redis.call('HGET', KEYS[2], 'held_bytes')) or 0
  redis.call('HSET', KEYS[2], 'held_bytes', math.max(held - freed, 0))
end
return kept
