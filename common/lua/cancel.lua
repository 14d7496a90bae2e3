-- Cancel. KEYS: gen hash, rq queue list. ARGV: now.
-- Returns the status after the call: 'canceled:new' (was queued), 'running' (flag set), '' (gone), or the
-- final status that makes a cancel a conflict.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return '' end
if status == 'queued' then
  local gid = redis.call('HGET', KEYS[1], 'id')
  local owner = redis.call('HGET', KEYS[1], 'owner')
  redis.call('ZREM', KEY.pending(owner), gid)
  redis.call('LREM', KEYS[2], 0, redis.call('HGET', KEYS[1], 'rq_job_id'))
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_at', ARGV[1], 'cancel', '1',
             'progress', '{"step":0,"total_steps":0,"stage":"queued","eta_seconds":null}')
  return 'canceled:new'
end
if status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  return 'running'
end
return status
