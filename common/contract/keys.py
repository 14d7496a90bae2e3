"""Redis key names, in one place so API, worker, dispatcher and cleanup agree (rq's own: common/rq_internals.py)."""

from common import rq_internals

GENERATION_QUEUE = rq_internals.GENERATION_QUEUE
WEBHOOK_QUEUE = rq_internals.WEBHOOK_QUEUE

PREFIX = "sdxl"
RQ_QUEUE_KEY = rq_internals.QUEUE_KEY  # rq's own keys
RQ_QUEUES_SET = rq_internals.QUEUES_SET
RQ_INTERMEDIATE_KEY = rq_internals.INTERMEDIATE_KEY
rq_job = rq_internals.job_key
RQ_FUNCTION = "worker.tasks.run_generation"  # what rq runs, by dotted path: the API never imports worker code

WORKERS = f"{PREFIX}:workers"  # zset: worker id -> last heartbeat (unix seconds)
# a worker whose last heartbeat is older no longer counts as live: the default lease (12 s) plus one beat (3 s)
WORKER_LIVE_SECONDS = 15.0
RUNNING = f"{PREFIX}:running"  # set of generation ids currently running somewhere
ACTIVE_OWNERS = f"{PREFIX}:owners"  # zset of owners with pending work, scored by their turn
EXPIRY = f"{PREFIX}:expiry"  # zset: generation id -> expires_at (unix seconds)
CANCEL_CHANNEL = f"{PREFIX}:cancel"  # pub/sub: generation ids whose cancel was requested
STATS = f"{PREFIX}:stats"  # hash of counters shared across processes
METRICS = f"{PREFIX}:metrics"  # hash of cluster-wide metric counters and histogram buckets (contract/stats.py)
STRANDED = f"{PREFIX}:stranded"  # hash: rq job id -> when a reaper first saw it dequeued but never started


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


def worker_drain_hook(worker_id: str) -> str:
    """Set by a running preStop hook (worker/drain.py): the worker, once unregistered, waits for the hook to see
    it and delete this before exiting, since a hook still running when PID 1 exits is killed with the container."""
    return f"{PREFIX}:worker-drain:{worker_id}"


def owner_index(owner: str) -> str:
    """Per-owner zset of all its generation ids by creation time (for listing)."""
    return f"{PREFIX}:index:{owner}"


def webhook_log(gen_id: str) -> str:
    return f"{PREFIX}:webhooks:{gen_id}"


WEBHOOK_GONE = f"{PREFIX}:webhook-gone"  # set of URLs that answered 410 Gone: never delivered to again
WEBHOOK_DUE = f"{PREFIX}:webhook-due"  # zset: retry payload JSON -> unix time it is due (dispatcher pump)


def webhook_progress_gate(gen_id: str) -> str:
    """SET NX PX key: at most one progress webhook per generation per interval, across all processes."""
    return f"{PREFIX}:webhook-gate:{gen_id}"


def rate_bucket(owner: str) -> str:
    """Hash {tokens, ts}: the owner's request token bucket (app/limits.py)."""
    return f"{PREFIX}:rate:{owner}"


def active(owner: str) -> str:
    """Zset of the owner's non-final generation ids by creation time; pruned lazily (app/limits.py)."""
    return f"{PREFIX}:active:{owner}"


def idempotency(owner: str, key_digest: str) -> str:
    """String "<body sha256> <gen id> <claimed ms>" for one Idempotency-Key of one owner (app/idempotency.py)."""
    return f"{PREFIX}:idem:{owner}:{key_digest}"


# input images (app/uploads.py): each upload's record, and per owner the ids (by expiry) and their sizes
UPLOAD_EXPIRY = f"{PREFIX}:upload-expiry"  # zset: upload id -> expires_at (cleanup deletes the bytes)


def upload(upload_id: str) -> str:
    """Hash: owner, key, sha256, bytes, width, height, content_type, created_at, expires_at."""
    return f"{PREFIX}:upload:{upload_id}"


def owner_uploads(owner: str) -> str:
    """Zset: the owner's upload ids -> expires_at (listing, and the per-key count limit)."""
    return f"{PREFIX}:uploads:{owner}"


def owner_upload_bytes(owner: str) -> str:
    """Hash: the owner's upload ids -> size in bytes (the per-key byte limit)."""
    return f"{PREFIX}:upload-bytes:{owner}"


def upload_users(upload_id: str) -> str:
    """Set: generation ids that reference the upload (DELETE answers 409 while one of them is unfinished)."""
    return f"{PREFIX}:upload-users:{upload_id}"


# usage per API key (common/usage.py): what each owner's generations produced, per UTC day, and all-time totals
USAGE_IMAGES = f"{PREFIX}:usage-images"  # hash: owner -> images produced, all time (the metrics' counter)
USAGE_GPU_US = f"{PREFIX}:usage-gpu-us"  # hash: owner -> GPU microseconds, all time (the metrics' counter)


def usage_day(owner: str, day: str) -> str:
    """Hash {images, gpu_us, generations, admitted}: one owner's usage on one UTC day (`YYYY-MM-DD`). `admitted`
    counts images of generations submitted that day (the daily quota's figure); the others count successes."""
    return f"{PREFIX}:usage:{owner}:{day}"


def adapter_url(url_sha256: str) -> str:
    """An adapter URL fetched at submit (by the sha256 of the URL) -> its file's sha256 and base, for a while."""
    return f"{PREFIX}:adapter-url:{url_sha256}"
