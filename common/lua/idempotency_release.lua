-- KEYS: idempotency entry. ARGV: generation id. Deletes the entry only while it still names that id.
local held = redis.call('GET', KEYS[1])
if held and string.match(held, '^%S+ (%S+)') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
