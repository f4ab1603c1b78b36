-- KEYS: cg:id:{id}   ARGV: epoch, grace ms   Returns 1, or 0 if the binding is stale.
if not holds_live(KEYS[1], ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'live', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
