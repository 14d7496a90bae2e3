-- The compare-and-set every state change goes through. KEYS: generation hash.
-- ARGV: expected token ('' = any), comma list of allowed current statuses, then field/value pairs.
-- Returns 'OK', 'stale:<status>' (another attempt's token), the refusing status, or '' (record gone).
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return '' end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 'stale:' .. status end
local ok = false
for s in string.gmatch(ARGV[2], '[^,]+') do if s == status then ok = true end end
if not ok then return status end
if #ARGV > 2 then redis.call('HSET', KEYS[1], unpack(ARGV, 3)) end
return 'OK'
