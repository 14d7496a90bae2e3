-- A worker killed between rq's dequeue (into the intermediate list) and its start leaves a queued generation
-- nobody will run: put its job back at the front of the queue, once (LREM == 1 decides between reapers).
-- KEYS: rq intermediate list, rq queue list, gen hash. ARGV: rq job id. Returns 1 when put back.
if redis.call('HGET', KEYS[3], 'status') ~= 'queued' or redis.call('HGET', KEYS[3], 'rq_job_id') ~= ARGV[1] then
  return 0
end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[1])
return 1
