"""Everything a generation leaves behind, and removing all of it: used by DELETE and by `cleanup`.

Images go first: if the store is down the call raises StorageUnavailable with the record still in place,
so the next DELETE or sweep finds the objects again instead of orphaning them.
"""

import logging
from typing import Any

import redis
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from common.contract import keys
from common.storage import ObjectStore, generation_prefix

log = logging.getLogger("common.retention")

# The record's Redis TTL runs this long past `expires_at` (the API answers 404 from `expires_at` on), so the
# cleanup process can still read its owner and remove its index entries; without cleanup, Redis drops it.
RECORD_GRACE_SECONDS = 24 * 3600


def purge(
    r: redis.Redis,
    store: ObjectStore,
    storage_prefix: str,
    gen_id: str,
    rec: dict[str, Any] | None,
    worker_active: bool = False,
    sweep_again_at: float | None = None,
) -> int:
    """Remove a generation's images, record, events, index entries, webhook log and rq jobs.

    `worker_active`: a worker may still hold the job (its rq job and lease are the worker's to remove).
    `sweep_again_at`: keep an expiry entry so a later sweep removes images such a worker stores late.
    Returns how many objects were deleted.
    """
    removed = store.delete_prefix(generation_prefix(storage_prefix, gen_id))
    rec = rec or {}
    owner = rec.get("owner")
    pipe = r.pipeline(transaction=True)
    pipe.delete(keys.generation(gen_id), keys.events(gen_id), keys.webhook_log(gen_id))
    if owner:
        pipe.zrem(keys.owner_index(owner), gen_id)
        pipe.zrem(keys.pending(owner), gen_id)
    if rec.get("rq_job_id") and not worker_active:
        pipe.lrem(keys.RQ_QUEUE_KEY, 0, rec["rq_job_id"])
    if sweep_again_at is not None:
        pipe.zadd(keys.EXPIRY, {gen_id: sweep_again_at})
    else:
        pipe.zrem(keys.EXPIRY, gen_id)
    pipe.execute()
    if not worker_active:
        # the rq job hashes carry the prompt in their args: a deleted generation keeps none of it
        for attempt in range(1, int(rec.get("attempt") or 1) + 1):
            try:
                Job.fetch(f"{gen_id}-{attempt}", connection=r, serializer=JSONSerializer).delete()
            except NoSuchJobError:
                pass
    log.info("purged generation %s", gen_id, extra={"generation_id": gen_id, "objects": removed})
    return removed
