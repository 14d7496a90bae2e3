-- Requeue after a lost worker or a shutdown past its grace period. KEYS: gen hash, owners zset.
-- ARGV: expected old token ("" = any), new token, new rq job id, max attempts, now.
-- Returns 'requeued', 'failed' (attempts exhausted), 'stale' (another attempt's) or the refusing status.
local status = redis.call('HGET', KEYS[1], 'status')
local gid = redis.call('HGET', KEYS[1], 'id')
if status ~= 'running' then
  if gid then redis.call('SREM', KEY.RUNNING, gid) end
  return status or ''
end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 'stale' end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '1')
redis.call('SREM', KEY.RUNNING, gid)
if attempt >= tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[5], 'token', ARGV[2],
    'error', '{"type":"worker_lost","message":"the worker running this generation stopped responding"}')
  return 'failed'
end
local owner = redis.call('HGET', KEYS[1], 'owner')
redis.call('HSET', KEYS[1], 'status', 'queued', 'token', ARGV[2], 'rq_job_id', ARGV[3],
  'attempt', attempt + 1, 'worker_id', '',
  'progress', '{"step":0,"total_steps":0,"stage":"queued","eta_seconds":null}')
-- to the very front of its owner's line: it already waited once
redis.call('ZADD', KEY.pending(owner), -9e15, gid)
local turn = redis.call('HGET', KEY.STATS, 'turn') or '0'
redis.call('ZADD', KEYS[2], 'NX', turn, owner)
return 'requeued'
