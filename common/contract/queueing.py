"""Fair-share feeding of the rq queue.

rq queues are FIFO, so one key with 1,000 queued jobs would hold back everyone else. Submissions go to a
per-owner pending zset (ordered by priority, then arrival); FEED moves ids into the single rq queue in
round-robin order over owners, only while that queue is shorter than `max_depth` (about one batch per
worker). A newcomer's job therefore waits behind at most `max_depth` jobs of other owners.

The scripts touch keys derived from ids (pending:<owner>, gen:<id>): fine on a single Redis (not Cluster).
"""

from common.contract import keys

PRIORITY_SPAN = 10**13  # score = -priority * span + arrival ms: higher priority first, FIFO within


def lua_function(name: str, body: str) -> str:
    """A script's text as a local function: KEYS and ARGV become its parameters, so the text runs unchanged
    inside a larger script (several steps, one round trip)."""
    return f"local function {name}(KEYS, ARGV)\n{body}\nend\n"


def pending_score(priority: int, arrival_ms: int) -> int:
    return -priority * PRIORITY_SPAN + arrival_ms


# KEYS: rq queue list, owners zset. ARGV[1] = max depth, ARGV[2] = prefix. Returns how many ids were fed.
FEED = """
local fed = 0
local depth = tonumber(ARGV[1])
while redis.call('LLEN', KEYS[1]) < depth do
  local head = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #head == 0 then break end
  local owner = head[1]
  local pkey = ARGV[2] .. ':pending:' .. owner
  local popped = redis.call('ZPOPMIN', pkey)
  if #popped == 0 then
    redis.call('ZREM', KEYS[2], owner)
  else
    local gid = popped[1]
    local gkey = ARGV[2] .. ':gen:' .. gid
    local job = redis.call('HGET', gkey, 'rq_job_id')
    if job and redis.call('HGET', gkey, 'status') == 'queued' then
      redis.call('RPUSH', KEYS[1], job)
      fed = fed + 1
    end
    if redis.call('ZCARD', pkey) == 0 then
      redis.call('ZREM', KEYS[2], owner)
    else
      -- back of the line: the turn counter only grows
      redis.call('ZADD', KEYS[2], redis.call('HINCRBY', ARGV[2] .. ':stats', 'turn', 1), owner)
    end
  end
end
return fed
"""

# KEYS: pending zset of owner, owners zset. ARGV: gen id, score, prefix, owner.
SUBMIT = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
local turn = redis.call('HGET', ARGV[3] .. ':stats', 'turn') or '0'
redis.call('ZADD', KEYS[2], 'NX', turn, ARGV[4])
return 1
"""

# KEYS: gen hash, rq queue list. ARGV: prefix. Jobs ahead of this one across the fair-share structures.
POSITION = """
local owner = redis.call('HGET', KEYS[1], 'owner')
local gid = redis.call('HGET', KEYS[1], 'id')
local job = redis.call('HGET', KEYS[1], 'rq_job_id')
if not gid then return -1 end
local pos = redis.call('LPOS', KEYS[2], job)
if pos then return pos end
local rank = redis.call('ZRANK', ARGV[1] .. ':pending:' .. owner, gid)
if not rank then return 0 end
local ahead = redis.call('LLEN', KEYS[2]) + rank
local owners = redis.call('ZRANGE', ARGV[1] .. ':owners', 0, -1)
for _, o in ipairs(owners) do
  if o ~= owner then
    ahead = ahead + math.min(redis.call('ZCARD', ARGV[1] .. ':pending:' .. o), rank + 1)
  end
end
return ahead
"""

# Cancel: KEYS: gen hash, rq queue list. ARGV: prefix, now, canceled fields json-free marker.
# Returns the status after the call: 'canceled' (was queued or already canceled), 'running' (flag set),
# or the terminal status that makes cancel a conflict.
CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return '' end
if status == 'queued' then
  local gid = redis.call('HGET', KEYS[1], 'id')
  local owner = redis.call('HGET', KEYS[1], 'owner')
  redis.call('ZREM', ARGV[1] .. ':pending:' .. owner, gid)
  redis.call('LREM', KEYS[2], 0, redis.call('HGET', KEYS[1], 'rq_job_id'))
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_at', ARGV[2], 'cancel', '1',
             'progress', '{"step":0,"total_steps":0,"stage":"queued","eta_seconds":null}')
  return 'canceled:new'
end
if status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  return 'running'
end
return status
"""

# Requeue after a lost worker or a shutdown past its grace period. KEYS: gen hash, owners zset.
# ARGV: expected old token ("" = any), new token, new rq job id, prefix, max attempts, now.
# Returns 'requeued', 'failed' (attempts exhausted) or the refusing status.
REQUEUE = """
local status = redis.call('HGET', KEYS[1], 'status')
local gid = redis.call('HGET', KEYS[1], 'id')
if status ~= 'running' then
  if gid then redis.call('SREM', ARGV[4] .. ':running', gid) end
  return status or ''
end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 'stale' end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '1')
redis.call('SREM', ARGV[4] .. ':running', gid)
if attempt >= tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[6], 'token', ARGV[2],
    'error', '{"type":"worker_lost","message":"the worker running this generation stopped responding"}')
  return 'failed'
end
local owner = redis.call('HGET', KEYS[1], 'owner')
redis.call('HSET', KEYS[1], 'status', 'queued', 'token', ARGV[2], 'rq_job_id', ARGV[3],
  'attempt', attempt + 1, 'worker_id', '',
  'progress', '{"step":0,"total_steps":0,"stage":"queued","eta_seconds":null}')
-- to the very front of its owner's line: it already waited once
redis.call('ZADD', ARGV[4] .. ':pending:' .. owner, -9e15, gid)
local turn = redis.call('HGET', ARGV[4] .. ':stats', 'turn') or '0'
redis.call('ZADD', KEYS[2], 'NX', turn, owner)
return 'requeued'
"""

__all__ = ["FEED", "SUBMIT", "POSITION", "CANCEL", "REQUEUE", "keys", "pending_score"]
