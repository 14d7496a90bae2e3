-- A succeeded generation's usage, counted for the owner its record names: that UTC day's hash (which expires
-- with the retention) and the all-time totals behind the metrics. Integers only, so sums are exact.
-- KEYS: generation hash. ARGV: UTC day (YYYY-MM-DD), images, GPU microseconds, the day hash's expiry (unix s).
local owner = redis.call('HGET', KEYS[1], 'owner') or ''
local day = KEY.usage_day(owner, ARGV[1])
redis.call('HINCRBY', day, 'images', ARGV[2])
redis.call('HINCRBY', day, 'gpu_us', ARGV[3])
redis.call('HINCRBY', day, 'generations', 1)
redis.call('EXPIREAT', day, ARGV[4])
redis.call('HINCRBY', KEY.USAGE_IMAGES, owner, ARGV[2])
redis.call('HINCRBY', KEY.USAGE_GPU_US, owner, ARGV[3])
return 'OK'
