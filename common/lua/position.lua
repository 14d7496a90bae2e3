-- Jobs ahead of this one across the fair-share structures. KEYS: gen hash, rq queue list.
local owner = redis.call('HGET', KEYS[1], 'owner')
local gid = redis.call('HGET', KEYS[1], 'id')
local job = redis.call('HGET', KEYS[1], 'rq_job_id')
if not gid then return -1 end
local pos = redis.call('LPOS', KEYS[2], job)
if pos then return pos end
local rank = redis.call('ZRANK', KEY.pending(owner), gid)
if not rank then return 0 end
local ahead = redis.call('LLEN', KEYS[2]) + rank
local owners = redis.call('ZRANGE', KEY.ACTIVE_OWNERS, 0, -1)
for _, o in ipairs(owners) do
  if o ~= owner then
    ahead = ahead + math.min(redis.call('ZCARD', KEY.pending(o)), rank + 1)
  end
end
return ahead
