-- uses: transition
-- A worker's start: queued -> running with this attempt's token, the lease and the RUNNING entry (so the reaper
-- can always find a running generation), unless its deadline has passed. KEYS: generation hash, lease key,
-- RUNNING set. ARGV: token, worker id, lease seconds, now, field/value pairs. Answers as transition_read, or
-- {'deadline'}.
local check = transition({KEYS[1]}, {ARGV[1], 'queued'})  -- no fields: checks token and status, writes nothing
if check ~= 'OK' then return {check} end
local deadline = tonumber(redis.call('HGET', KEYS[1], 'deadline_at') or '')
if deadline and deadline < tonumber(ARGV[4]) then return {'deadline'} end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
redis.call('SADD', KEYS[3], string.match(KEYS[1], '[^:]+$'))
return {'OK', redis.call('HGETALL', KEYS[1])}
