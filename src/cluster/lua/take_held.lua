-- KEYS: cg:held:{id}, cg:id:{id}, cg:held:due   ARGV: id
-- Returns the held payloads, oldest first, and deletes them in the same step, so two resumes
-- (or a resume and the orphan sweep) can never both take them.
local entries = redis.call('XRANGE', KEYS[1], '-', '+')
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'held_bytes', 0)
end
local out = {}
for i, entry in ipairs(entries) do
  out[i] = entry[2][2]
end
return out
