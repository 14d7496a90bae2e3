"""Fair-share feeding of the rq queue.

rq queues are FIFO, so one key with 1,000 queued jobs would hold back everyone else. Submissions go to a
per-owner pending zset (ordered by priority, then arrival); FEED moves ids into the single rq queue in
round-robin order over owners, only while that queue is shorter than `max_depth` (about one batch per
worker). A newcomer's job therefore waits behind at most `max_depth` jobs of other owners.

The scripts (common/lua/feed.lua, submit.lua, position.lua, cancel.lua, requeue.lua) build keys from ids.
"""

PRIORITY_SPAN = 10**13  # score = -priority * span + arrival ms: higher priority first, FIFO within


def pending_score(priority: int, arrival_ms: int) -> int:
    return -priority * PRIORITY_SPAN + arrival_ms
