"""The numbers an autoscaler needs, as one small JSON object (`GET /metrics/scaling`; docs/kubernetes.md).

KEDA's metrics-api scaler reads `work` from it and divides by the worker replicas (metricType AverageValue), so
the workers scale on the work there is per worker. `work` counts what waits and what runs:

- queued: the fair-share lines not yet fed to rq (`pending`, the same count as /metrics' `sdxl_queue_depth`
  {queue="pending"}) plus the ids already in rq's list (at most SDXL_QUEUE_FEED_DEPTH of them). The rq list
  alone stays short by design, which is why KEDA's Redis list scaler would see almost nothing.
- running: generations some worker holds now (`sdxl:running`), so busy workers are not scaled away while their
  jobs run.

One pipelined round trip plus one for the workers' states, read with the API's sync Redis client (off the event
loop, as /metrics is).
"""

import time
from dataclasses import asdict, dataclass

import redis

from common import scripts
from common.contract import keys, queueing
from common.contract.records import as_str


@dataclass(frozen=True)
class Scaling:
    work: int  # queued + running: the value KEDA divides by the worker replicas
    queued: int  # pending + fed
    pending: int  # in the per-key fair-share lines, not yet fed to rq
    fed: int  # in rq's queue list, waiting for a worker to take them
    running: int  # held by a worker now
    workers_live: int  # fresh heartbeat
    workers_ready: int  # fresh heartbeat and state ready or busy (models loaded, warm)

    def as_json(self) -> dict[str, int]:
        return asdict(self)


def read(r: redis.Redis) -> Scaling:
    pipe = r.pipeline(transaction=False)
    pipe.eval(scripts.source("pending"), 1, keys.ACTIVE_OWNERS, queueing.PRIORITY_SPAN)
    pipe.llen(keys.RQ_QUEUE_KEY)
    pipe.scard(keys.RUNNING)
    pipe.zrangebyscore(keys.WORKERS, time.time() - keys.WORKER_LIVE_SECONDS, "+inf")
    (pending, _oldest), fed, running, live_ids = pipe.execute()
    pipe = r.pipeline(transaction=False)
    for wid in live_ids:
        pipe.hget(keys.worker(as_str(wid)), "state")
    states = [as_str(s) for s in pipe.execute() if s is not None]
    queued = int(pending) + int(fed)
    return Scaling(
        work=queued + int(running),
        queued=queued,
        pending=int(pending),
        fed=int(fed),
        running=int(running),
        workers_live=len(states),
        workers_ready=sum(s in ("ready", "busy") for s in states),
    )
