-- uses: transition_emit, count_usage
-- A running generation's success (transition_emit) and its usage (count_usage) in one script: a refused change
-- (another attempt's token, canceled meanwhile, already final) counts nothing, so a retried or duplicate finish
-- never counts twice, and a counted success is always a stored one.
-- KEYS: generation hash, its event stream. ARGV: count_usage's four, then transition_emit's.
local res = transition_emit({KEYS[1], KEYS[2]}, {unpack(ARGV, 5)})
if res[1] == 'OK' then count_usage({KEYS[1]}, {ARGV[1], ARGV[2], ARGV[3], ARGV[4]}) end
return res
