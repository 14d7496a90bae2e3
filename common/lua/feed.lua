-- Fair-share feeding: move ids from the per-owner pending lines into the single rq queue, round-robin over
-- owners, while that queue is shorter than the depth (about one batch per worker).
-- KEYS: rq queue list, owners zset. ARGV: max depth. Returns how many ids were fed.
local fed = 0
local depth = tonumber(ARGV[1])
while redis.call('LLEN', KEYS[1]) < depth do
  local head = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #head == 0 then break end
  local owner = head[1]
  local pkey = KEY.pending(owner)
  local popped = redis.call('ZPOPMIN', pkey)
  if #popped == 0 then
    redis.call('ZREM', KEYS[2], owner)
  else
    local gid = popped[1]
    local gkey = KEY.generation(gid)
    local job = redis.call('HGET', gkey, 'rq_job_id')
    if job and redis.call('HGET', gkey, 'status') == 'queued' then
      redis.call('RPUSH', KEYS[1], job)
      fed = fed + 1
    end
    if redis.call('ZCARD', pkey) == 0 then
      redis.call('ZREM', KEYS[2], owner)
    else
      -- back of the line: the turn counter only grows
      redis.call('ZADD', KEYS[2], redis.call('HINCRBY', KEY.STATS, 'turn', 1), owner)
    end
  end
end
return fed
