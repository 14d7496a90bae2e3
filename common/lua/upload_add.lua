-- Record one upload within its owner's count and byte limits, atomically (concurrent uploads cannot both
-- squeeze under a limit). The owner's expired uploads stop counting first.
-- KEYS: upload hash, owner's upload zset, owner's sizes hash, the global upload expiry zset.
-- ARGV: now, max count, max bytes, this size, expires_at, upload id, record expire-at, field, value, ...
-- Returns {0, count} when written, {1, count} over the count limit, {2, bytes} over the byte limit.
local now = tonumber(ARGV[1])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
end
local count = redis.call('ZCARD', KEYS[2])
if count + 1 > tonumber(ARGV[2]) then return {1, count} end
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[3])) do total = total + tonumber(v) end
if total + tonumber(ARGV[4]) > tonumber(ARGV[3]) then return {2, total} end
redis.call('HSET', KEYS[1], unpack(ARGV, 8))
redis.call('EXPIREAT', KEYS[1], ARGV[7])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[6])
redis.call('HSET', KEYS[3], ARGV[6], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[6])
return {0, count + 1}
