-- uses: transition
-- A running generation's change and its event, for an owner that knows the record after the change: the event
-- is appended only when the compare-and-set succeeds. KEYS: generation hash, its event stream, optionally a list
-- whose length is answered too (the rq queue). ARGV: token, allowed statuses, stream maxlen, stream ttl, event
-- type, event body (the resource JSON), then field/value pairs. Returns {'OK', event id, length} or
-- {refusal, '', length}; length -1 without KEYS[3].
local res = transition({KEYS[1]}, {ARGV[1], ARGV[2], unpack(ARGV, 7)})
local length = -1
if KEYS[3] then length = redis.call('LLEN', KEYS[3]) end
if res ~= 'OK' then return {res, '', length} end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'type', ARGV[5], 'data', ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {'OK', id, length}
