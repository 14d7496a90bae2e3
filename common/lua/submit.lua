-- A generation joins its owner's line; the owner joins the round-robin at the current turn.
-- KEYS: the owner's pending zset, owners zset. ARGV: gen id, score, owner.
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
local turn = redis.call('HGET', KEY.STATS, 'turn') or '0'
redis.call('ZADD', KEYS[2], 'NX', turn, ARGV[3])
return 1
