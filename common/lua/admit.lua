-- Admission. KEYS: the owner's active zset, rq queue list, owners zset.
-- ARGV: gen id, now, max unfinished for the owner, max global queue depth, ttl seconds.
-- Returns {0, unfinished} admitted (id reserved), {1, unfinished} owner at its cap, {2, depth} queue full.
local function is_final(gid)
  local s = redis.call('HGET', KEY.generation(gid), 'status')
  return (not s) or s == 'succeeded' or s == 'failed' or s == 'canceled'
end
local function prune(n)
  for _, gid in ipairs(redis.call('ZRANGE', KEYS[1], 0, n - 1)) do
    if is_final(gid) then redis.call('ZREM', KEYS[1], gid) end
  end
end
prune(8)  -- the oldest usually finish first: this keeps the set near its true size at little cost
local cap = tonumber(ARGV[3])
local count = redis.call('ZCARD', KEYS[1])
if count >= cap then
  prune(count)
  count = redis.call('ZCARD', KEYS[1])
  if count >= cap then return {1, count} end
end
local depth = redis.call('LLEN', KEYS[2])
for _, owner in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  depth = depth + redis.call('ZCARD', KEY.pending(owner))
end
if depth >= tonumber(ARGV[4]) then return {2, depth} end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {0, count + 1}
