-- KEYS: idempotency entry. ARGV: value, ttl seconds. Returns the existing value, or nil after claiming.
local held = redis.call('GET', KEYS[1])
if held then return held end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
