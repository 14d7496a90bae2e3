-- uses: transition
-- transition, answering the record it wrote: {'OK', {field, value, ...}} or {refusal}.
local res = transition(KEYS, ARGV)
if res ~= 'OK' then return {res} end
return {'OK', redis.call('HGETALL', KEYS[1])}
