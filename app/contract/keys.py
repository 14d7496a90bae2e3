"""Redis key names, in one place so API, worker, dispatcher and cleanup agree."""

PREFIX = "sdxl"
GENERATION_QUEUE = "sdxl-generations"  # the rq queue the GPU workers listen on
WEBHOOK_QUEUE = "sdxl-webhooks"  # the rq queue of the webhook dispatcher
RQ_QUEUE_KEY = f"rq:queue:{GENERATION_QUEUE}"
RQ_QUEUES_SET = "rq:queues"

WORKERS = f"{PREFIX}:workers"  # zset: worker id -> last heartbeat (unix seconds)
RUNNING = f"{PREFIX}:running"  # set of generation ids currently running somewhere
ACTIVE_OWNERS = f"{PREFIX}:owners"  # zset of owners with pending work, scored by their turn
EXPIRY = f"{PREFIX}:expiry"  # zset: generation id -> expires_at (unix seconds)
CANCEL_CHANNEL = f"{PREFIX}:cancel"  # pub/sub: generation ids whose cancel was requested
STATS = f"{PREFIX}:stats"  # hash of counters shared across processes


def generation(gen_id: str) -> str:
    return f"{PREFIX}:gen:{gen_id}"


def events(gen_id: str) -> str:
    return f"{PREFIX}:events:{gen_id}"


def lease(gen_id: str) -> str:
    return f"{PREFIX}:lease:{gen_id}"


def pending(owner: str) -> str:
    """Per-owner zset of generation ids waiting to be fed to the rq queue."""
    return f"{PREFIX}:pending:{owner}"


def worker(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"


def owner_index(owner: str) -> str:
    """Per-owner zset of all its generation ids by creation time (for listing)."""
    return f"{PREFIX}:index:{owner}"


def webhook_log(gen_id: str) -> str:
    return f"{PREFIX}:webhooks:{gen_id}"
