-- Queued generations not yet fed to rq, and the oldest arrival (ms) among them. KEYS: owners zset.
-- ARGV: score span per priority level. Pending scores are -priority * span + arrival ms, so the oldest is the
-- head of one of the levels: one ZRANGEBYSCORE per level present. Requeued entries (score -9e15) say nothing
-- about age: their record's created_at counts.
local span = tonumber(ARGV[1])
local count, oldest = 0, -1
local function older(ms) if ms and (oldest < 0 or ms < oldest) then oldest = ms end end
for _, owner in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local pkey = KEY.pending(owner)
  count = count + redis.call('ZCARD', pkey)
  for _, gid in ipairs(redis.call('ZRANGEBYSCORE', pkey, '-inf', '(-1e15', 'LIMIT', 0, 20)) do
    local created = redis.call('HGET', KEY.generation(gid), 'created_at')
    if created then older(tonumber(created) * 1000) end
  end
  local lo = '-1e15'
  for _ = 1, 64 do
    local head = redis.call('ZRANGEBYSCORE', pkey, lo, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    if #head == 0 then break end
    local score = tonumber(head[2])
    local level = math.floor(score / span)
    older(score - level * span)
    lo = string.format('%.17g', (level + 1) * span)
  end
end
return {count, math.floor(oldest)}
