-- KEYS: cg:id:{id}, cg:held:{id}, cg:held:due
-- ARGV: epoch expected ('' for any), payload, max messages, max bytes, grace ms, max bytes total, id,
--       '1' for a marker (a missed range: tiny, and never refused for the caps, which it reports)
-- Returns 1 held, 0 no such client, 2 moved (epoch differs: locate again), 3 too many messages,
-- 4 too many bytes for this ID, 5 too many bytes held cluster-wide. The caps are checked before
-- XADD, so nothing already held is ever trimmed away without its sender being told.
--
-- The cluster-wide budget counts the bytes held per grace-long window (cg:held:bytes:{window},
-- by Redis's clock) over the current and the last five windows. A stream's messages arrive while
-- its ID lives (at most a reservation: 1.5 grace, or a lease) and the stream lives a grace
-- longer than the ID: about four grace periods from first message to deletion, under the five
-- full windows counted. So every byte still held is counted, and bytes already taken keep
-- counting until their window passes (conservative, never under).
local e, held = unpack(redis.call('HMGET', KEYS[1], 'epoch', 'held_bytes'))
if not e then
  return 0
end
if ARGV[1] ~= '' and e ~= ARGV[1] then
  return 2
end
local marker = ARGV[8] == '1'
if not marker and redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[3]) then
  return 3
end
local size = string.len(ARGV[2])
if not marker and (tonumber(held) or 0) + size > tonumber(ARGV[4]) then
  return 4
end
local grace = tonumber(ARGV[5])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local window = math.floor(now / grace)
local total = 0
for w = window - 5, window do
  total = total + (tonumber(redis.call('GET', 'cg:held:bytes:' .. w)) or 0)
end
if not marker and total + size > tonumber(ARGV[6]) then
  return 5
end
redis.call('XADD', KEYS[2], '*', 'm', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'held_bytes', size)
-- Live a grace period longer than the ID can still be resumed: if the ID expires unresumed (its
-- node died), the orphan sweep (orphans.lua) still finds the messages and their senders are told.
local id_ttl = redis.call('PTTL', KEYS[1])
redis.call('PEXPIRE', KEYS[2], math.max(grace, id_ttl) + grace)
-- When to look for the ID next; entries older than any stream can live are dropped, and the
-- index itself expires when holds stop, so it stays bounded with or without a sweep.
redis.call('ZADD', KEYS[3], now + math.max(id_ttl, 0), ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - 10 * grace)
redis.call('PEXPIRE', KEYS[3], 10 * grace)
local counter = 'cg:held:bytes:' .. window
redis.call('INCRBY', counter, size)
redis.call('PEXPIRE', counter, grace * 7)
return 1
