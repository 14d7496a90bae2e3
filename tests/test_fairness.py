"""Fair share between keys and priority within a key, on one real worker.

A blocker generation holds the only worker while a test queues its work, then is canceled: from that moment
the order in which the worker starts generations is decided by the queueing design alone (per-owner pending
zsets fed round-robin into the rq list, at most SDXL_QUEUE_FEED_DEPTH ids ahead). The order is read back from
each generation's started_at. The per-key priority bound at submit needs no worker: tests/api/test_fairness.py."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.access import BLOCKER, TINY, Key, cancel, keys_env, post, service_with, started, wait_final, wait_status
from tests.procs import Service

FEED_DEPTH = 4  # the default, stated here so the bound below is explicit
A = Key("tenant-a")
B = Key("tenant-b")
OTHER = Key("blocker")


@pytest.fixture(scope="module")
def svc(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = {"SDXL_API_KEYS": keys_env(A, B, OTHER), "SDXL_QUEUE_FEED_DEPTH": str(FEED_DEPTH)}
    with service_with(tiny_model, tmp_path_factory.mktemp("fair"), 1, env) as s:
        yield s


def hold_worker(svc: Service) -> str:
    gid = post(svc.url, BLOCKER, OTHER).json()["id"]
    wait_status(svc.url, gid, OTHER, {"running"})
    return str(gid)


def release_worker(svc: Service, gid: str) -> None:
    # 202 proves the blocker was still holding the worker while the test queued its work
    assert cancel(svc.url, gid, OTHER).status_code == 202
    assert wait_final(svc.url, gid, OTHER)["status"] == "canceled"


def submit(svc: Service, key: Key, n: int, **extra: Any) -> list[str]:
    ids = []
    for i in range(n):
        res = post(svc.url, {"prompt": f"{key.name} {i}", **TINY, **extra}, key)
        assert res.status_code == 202, res.text
        ids.append(res.json()["id"])
    return ids


def finals(svc: Service, key: Key, ids: list[str]) -> list[dict[str, Any]]:
    done = [wait_final(svc.url, gid, key, timeout=300) for gid in ids]
    assert all(g["status"] == "succeeded" for g in done), [g["status"] for g in done]
    return done


def test_a_newcomer_waits_behind_at_most_feed_depth_plus_one_of_a_heavy_key(svc: Service) -> None:
    blocker = hold_worker(svc)
    heavy = submit(svc, A, 40)
    (light,) = submit(svc, B, 1)
    release_worker(svc, blocker)

    b = finals(svc, B, [light])[0]
    for gid in heavy:  # what runs after B's job does not matter here: stop it rather than wait for it
        cancel(svc.url, gid, A)
    a = [wait_final(svc.url, gid, A) for gid in heavy]
    ahead = [g for g in a if g["started_at"] and started(g) < started(b)]
    assert len(ahead) <= FEED_DEPTH + 1, f"{len(ahead)} of A's jobs started before B's one"
    # plain FIFO would have run all 40 first: the bound is not met by accident
    assert len(a) - len(ahead) >= 40 - FEED_DEPTH - 1


def test_priority_orders_work_within_a_key(svc: Service) -> None:
    blocker = hold_worker(svc)
    normal = submit(svc, A, 8)  # the first FEED_DEPTH go straight into the rq list; the rest wait in line
    (p1,) = submit(svc, A, 1, priority=1)
    (p2,) = submit(svc, A, 1, priority=2)
    release_worker(svc, blocker)

    gens = {g["id"]: g for g in finals(svc, A, [*normal, p1, p2])}
    order = sorted(gens, key=lambda gid: started(gens[gid]))
    # already fed ones run first (FIFO), then the highest priority, then the next, then the rest in arrival order
    assert order == normal[:FEED_DEPTH] + [p2, p1] + normal[FEED_DEPTH:]
