-- uses: admit, submit, feed, position
-- The whole submit, atomic: admission (a refused submit writes nothing), the rq job hash, the generation record
-- and its indexes, the owner's fair-share line, FEED and the queue position.
-- KEYS: 1 gen hash, 2 rq job hash, 3 owner's active zset, 4 rq queue list, 5 owners zset, 6 owner's pending
-- zset, 7 owner's index zset, 8 expiry zset, 9 rq queues set.
-- ARGV: see the names below. The job's fields (all but `data`) and the record's come as JSON objects of strings.
-- Returns {0, unfinished, position} written, or admit's refusal {1 | 2, count, -1} with nothing written.
local gen_id, now, check, cap, max_depth, ttl, record_ttl, score, owner, expires_at, feed_depth, rq_queue,
      job_fields, job_data, record = unpack(ARGV)
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
hset(KEYS[2], job_fields, {'data', job_data})
hset(KEYS[1], record, {})
redis.call('EXPIRE', KEYS[1], record_ttl)
redis.call('ZADD', KEYS[7], now, gen_id)
redis.call('ZADD', KEYS[8], expires_at, gen_id)
redis.call('SADD', KEYS[9], rq_queue)
submit({KEYS[6], KEYS[5]}, {gen_id, score, owner})
feed({KEYS[4], KEYS[5]}, {feed_depth})
return {0, count, position({KEYS[1], KEYS[4]}, {})}
