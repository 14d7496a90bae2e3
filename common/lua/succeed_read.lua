-- uses: transition_read, count_usage
-- succeed's twin for a finish whose owner may be behind the hash (transition_read: answers the record written).
-- KEYS: generation hash. ARGV: count_usage's four, then transition_read's.
local res = transition_read({KEYS[1]}, {unpack(ARGV, 5)})
if res[1] == 'OK' then count_usage({KEYS[1]}, {ARGV[1], ARGV[2], ARGV[3], ARGV[4]}) end
return res
