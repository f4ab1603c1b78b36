-- KEYS: cg:id:{id}   ARGV: epoch, id   Returns {1, peer reset or ''}, or {0} if stale.
if not holds_live(KEYS[1], ARGV[1]) then
  return { 0 }
end
return { 1, free(KEYS[1], ARGV[2]) }
