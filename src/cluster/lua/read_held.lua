-- KEYS: cg:held:{id}, cg:id:{id}   ARGV: epoch of the reader
-- Reads the held entries, oldest first, without deleting them: {entry id, payload, ...}, or
-- false if the ID is not (any more) at the reader's epoch. The reader delivers them, then trims
-- up to the last entry it delivered (trim_held.lua), so a reply lost to a timeout loses nothing:
-- the entries are still there for the retry. Two readers cannot both deliver: only the node
-- holding the ID at its epoch reads, and a resume elsewhere changes the epoch.
if redis.call('HGET', KEYS[2], 'epoch') ~= ARGV[1] then
  return false
end
local entries = redis.call('XRANGE', KEYS[1], '-', '+')
local out = {}
for _, entry in ipairs(entries) do
  out[#out + 1] = entry[1]
  out[#out + 1] = entry[2][2]
end
return out
