"""Usage per key end to end: a real API (two processes, one restarted), a real micro-batching worker and Redis
(tests/e2e/conftest.py `batching_stack`). Concurrent generations of several sizes share pipeline calls; the day's
usage is exactly the sum of their recorded timings' shares, in whole microseconds, through `GET /v1/usage`, the
metrics and an API restart. The daily quota answers 429 at its limit, also to concurrent submits on two APIs."""

import datetime as dt
import json
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cli import sdxl
from common.usage import gpu_share_us, seconds_to_next_day, utc_day
from tests.access import BLOCKER, TINY, Key, cancel, get, keys_env, post, wait_final, wait_status
from tests.procs import Service

USER = Key("user")
LIMITED = Key("limited", daily_image_quota=4)
BLOCKS = Key("blocks")  # holds the worker while the others queue up, then is canceled
SIZES = [1, 2, 1, 3, 1, 2, 1]  # images per request: they batch together (same size, steps, scheduler...)


@pytest.fixture(scope="module")
def keyed(batching_stack: Service) -> Iterator[Service]:
    """API processes with keys on the batching stack's Redis and worker."""
    view = batching_stack.view(SDXL_API_KEYS=keys_env(USER, LIMITED, BLOCKS))
    view.start_api()
    yield view
    view.stop()


def usage(url: str, key: Key, **params: str) -> dict[str, Any]:
    res = get(url, "/v1/usage", key, **params)
    assert res.status_code == 200, res.text
    return dict(res.json())


def metrics(url: str) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, s.labels.get("key", "")): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name.startswith("sdxl_usage_")}


def hold_the_worker(url: str) -> str:
    blocker = post(url, BLOCKER, BLOCKS).json()
    wait_status(url, blocker["id"], BLOCKS, {"running"})
    return str(blocker["id"])


def test_concurrent_generations_sum_exactly_and_survive_an_api_restart(keyed: Service,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    url = keyed.url
    blocker = hold_the_worker(url)  # the others queue meanwhile, so the worker takes them in micro-batches
    with ThreadPoolExecutor(max_workers=len(SIZES)) as pool:
        answers = list(pool.map(lambda n: post(url, {**TINY, "prompt": f"usage {n}", "num_images_per_prompt": n},
                                               USER), SIZES))
    assert [a.status_code for a in answers] == [202] * len(SIZES), [a.text for a in answers]
    assert cancel(url, blocker, BLOCKS).status_code == 202
    gens = [wait_final(url, a.json()["id"], USER) for a in answers]
    assert [g["status"] for g in gens] == ["succeeded"] * len(SIZES)

    expected: dict[str, dict[str, int]] = defaultdict(lambda: {"images": 0, "gpu_microseconds": 0, "generations": 0})
    for g in gens:
        t, n = g["timings"], len(g["images"])
        share = gpu_share_us(t["pipeline"], n, t["batch_images"])
        assert round(t["gpu_seconds"] * 1_000_000) == share  # the record shows what usage counts
        day = expected[utc_day(dt.datetime.fromisoformat(g["finished_at"]).timestamp())]
        day["images"] += n
        day["gpu_microseconds"] += share
        day["generations"] += 1
    assert any(g["timings"]["batch_images"] > len(g["images"]) for g in gens), "no micro-batch ran"
    assert sum(d["generations"] for d in expected.values()) == len(SIZES)

    before = usage(url, USER)
    days = {d["date"]: d for d in before["days"]}
    for day, figures in expected.items():
        assert {k: days[day][k] for k in figures} == figures, (day, days[day])
        assert days[day]["gpu_seconds"] == figures["gpu_microseconds"] / 1_000_000
    assert before["totals"]["images"] == sum(SIZES) == before["totals"]["images_submitted"]
    assert before["totals"]["gpu_microseconds"] == sum(d["gpu_microseconds"] for d in expected.values())
    # a canceled generation produced nothing (its submit still counts as submitted)
    blocks = usage(url, BLOCKS)["totals"]
    assert (blocks["images"], blocks["gpu_microseconds"], blocks["images_submitted"]) == (0, 0, 1)
    seen = metrics(url)
    assert seen[("sdxl_usage_images_total", "user")] == sum(SIZES)
    assert seen[("sdxl_usage_gpu_seconds_total", "user")] == before["totals"]["gpu_microseconds"] / 1_000_000
    assert ("sdxl_usage_images_total", "blocks") not in seen

    # the CLI prints the same report
    assert sdxl.main(["usage", "--url", url, "--key", USER.secret, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == before
    assert sdxl.main(["usage", "--url", url, "--key", USER.secret]) == 0
    table = capsys.readouterr().out
    assert f"{'total':<12}{sum(SIZES):>8}" in table and "key user" in table

    # the figures live in Redis: a restarted API answers the same
    first = keyed.apis.pop()
    first.terminate()
    first.stop()
    keyed.port = 0
    url = keyed.start_api()
    assert usage(url, USER) == before
    assert metrics(url)[("sdxl_usage_images_total", "user")] == sum(SIZES)


def test_the_quota_answers_429_at_its_limit_even_to_concurrent_submits(keyed: Service) -> None:
    urls = [keyed.url, keyed.start_api()]  # two API processes, one Redis
    blocker = hold_the_worker(urls[0])
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda i: post(urls[i % 2], {**TINY, "prompt": f"quota {i}"}, LIMITED), range(6)))
    accepted = [a for a in answers if a.status_code == 202]
    refused = [a for a in answers if a.status_code != 202]
    assert len(accepted) == 4 and len(refused) == 2, [a.status_code for a in answers]
    for res in refused:
        assert res.status_code == 429 and res.headers["content-type"] == "application/problem+json"
        body = res.json()
        assert body["type"] == "urn:sdxl:problem:daily-quota-exceeded", body
        assert "daily quota of 4 images" in body["detail"] and "4 already submitted today" in body["detail"], body
        wait = int(res.headers["retry-after"])
        assert abs(wait - seconds_to_next_day(dt.datetime.now(dt.UTC).timestamp())) <= 60  # the next UTC midnight
    cancel(urls[0], blocker, BLOCKS)
    for a in accepted:
        assert wait_final(urls[1], a.json()["id"], LIMITED)["status"] == "succeeded"
    report = usage(urls[1], LIMITED)
    assert report["quota"] == {**report["quota"], "daily_images": 4, "submitted_today": 4, "remaining_today": 0}
    assert report["totals"]["images"] == 4 and report["totals"]["generations"] == 4
    # the quota counts what was submitted: finished generations give nothing back
    assert post(urls[1], {**TINY, "prompt": "one more"}, LIMITED).status_code == 429
