-- Claim due webhook retries for a lease: a dispatcher that dies between claim and enqueue loses nothing, the
-- entry comes back when the lease ends (at least once; receivers dedupe on webhook-id).
-- KEYS: due zset. ARGV: now, lease end, max items. Returns the claimed entries.
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, m in ipairs(items) do redis.call('ZADD', KEYS[1], ARGV[2], m) end
return items
