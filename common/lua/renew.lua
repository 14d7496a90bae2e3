-- Renew one attempt's lease and read its flags. KEYS: lease, generation hash. ARGV: worker id, token, seconds.
-- A lease that lapsed (the process stalled, or Redis was away longer than the lease) stays lapsed: a reaper may
-- already be requeueing the generation. Answers {token still ours 0/1, cancel flag 0/1, renewed 0/1}.
local rec = redis.call('HMGET', KEYS[2], 'token', 'cancel')
local mine = rec[1] == ARGV[2]
local renewed = 0
if mine and redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  renewed = 1
end
return {mine and 1 or 0, rec[2] == '1' and 1 or 0, renewed}
