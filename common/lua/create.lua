-- uses: admit, submit, feed, position
-- The whole submit, atomic: admission (a refused submit writes nothing), the rq job hash, the generation record
-- and its indexes, the owner's fair-share line, FEED and the queue position.
-- KEYS: 1 gen hash, 2 rq job hash, 3 owner's active zset, 4 rq queue list, 5 owners zset, 6 owner's pending
-- zset, 7 owner's index zset, 8 expiry zset, 9 rq queues set, 10 the owner's usage hash of today (UTC).
-- ARGV: see the names below. The job's fields (all but `data`) and the record's come as JSON objects of strings.
-- `images` are reserved against the owner's daily quota (`quota`, 0 = none) in the same script as admission,
-- so concurrent submits cannot overshoot it.
-- Returns {0, unfinished, position} written, admit's refusal {1 | 2, count, -1}, or {3, images admitted today,
-- -1} over the daily quota, with nothing written.
local gen_id, now, check, cap, max_depth, ttl, record_ttl, score, owner, expires_at, feed_depth, rq_queue,
      job_fields, job_data, record, images, quota, usage_expires_at = unpack(ARGV)
local admitted = tonumber(redis.call('HGET', KEYS[10], 'admitted') or '0')
if tonumber(quota) > 0 and admitted + tonumber(images) > tonumber(quota) then return {3, admitted, -1} end
local count = 0
if check == '1' then
  local res = admit({KEYS[3], KEYS[4], KEYS[5]}, {gen_id, now, cap, max_depth, ttl})
  if res[1] ~= 0 then return {res[1], res[2], -1} end
  count = res[2]
end
local function hset(key, fields, extra)
  for name, value in pairs(cjson.decode(fields)) do
    extra[#extra + 1] = name
    extra[#extra + 1] = value
  end
  redis.call('HSET', key, unpack(extra))
end
redis.call('HINCRBY', KEYS[10], 'admitted', images)
redis.call('EXPIREAT', KEYS[10], usage_expires_at)
hset(KEYS[2], job_fields, {'data', job_data})
hset(KEYS[1], record, {})
redis.call('EXPIRE', KEYS[1], record_ttl)
redis.call('ZADD', KEYS[7], now, gen_id)
redis.call('ZADD', KEYS[8], expires_at, gen_id)
redis.call('SADD', KEYS[9], rq_queue)
submit({KEYS[6], KEYS[5]}, {gen_id, score, owner})
feed({KEYS[4], KEYS[5]}, {feed_depth})
return {0, count, position({KEYS[1], KEYS[4]}, {})}
