-- KEYS: cg:held:due   ARGV: most IDs to look at
-- The orphan sweep: messages held for IDs that expired without a resume (their node died, so
-- nobody called expire and take_held). Looks at the IDs whose time has come; one still held is
-- looked at again when its key would expire; one gone has its messages taken (and deleted, in
-- the same step as any other take) and returned: {id, {payload...}, id, {payload...}, ...}.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
for _, id in ipairs(due) do
  local ttl = redis.call('PTTL', 'cg:id:' .. id)
  if ttl > 0 then
    redis.call('ZADD', KEYS[1], now + ttl, id)
  else
    local held = 'cg:held:' .. id
    local entries = redis.call('XRANGE', held, '-', '+')
    redis.call('DEL', held)
    redis.call('ZREM', KEYS[1], id)
    if #entries > 0 then
      local payloads = {}
      for i, entry in ipairs(entries) do
        payloads[i] = entry[2][2]
      end
      out[#out + 1] = id
      out[#out + 1] = payloads
    end
  end
end
return out
