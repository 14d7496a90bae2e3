"""GET /v1/usage, the daily image quota and the per-key usage metrics, on in-process API replicas over the private
Redis. No worker runs here: submits stay queued (what the quota counts), and produced usage is written as the
worker's success script writes it (common/lua/count_usage.lua, run through its own loader)."""

import datetime as dt
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from cli import apikeys
from common import scripts
from common.contract import keys
from common.usage import Success, day_expires_at, seconds_to_next_day
from tests.api.test_error_format import assert_problem
from tests.client import TINY, Key, create, get, keys_env

QUOTA = Key("quota", daily_image_quota=5)
FREE = Key("free")  # no quota of its own: SDXL_DEFAULT_DAILY_IMAGE_QUOTA (unset: none)
BODY = {"prompt": "counted", **TINY}


@pytest.fixture
def api(make_api: Callable[..., httpx.Client]) -> httpx.Client:
    return make_api(api_keys=keys_env(QUOTA, FREE))


@pytest.fixture
def replica(make_api: Callable[..., httpx.Client]) -> httpx.Client:
    return make_api(api_keys=keys_env(QUOTA, FREE))


def today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def produced(r: redis.Redis, owner: str, day: dt.date, images: int, pipeline: float, batch: int,
             retention_days: int = 90) -> None:
    """What a worker's success of `owner`'s generation finished on `day` counts (the script it runs)."""
    gen = f"sdxl:gen:usage-test-{owner}-{day}-{images}-{pipeline}"
    r.hset(gen, "owner", owner)
    noon = dt.datetime(day.year, day.month, day.day, 12, tzinfo=dt.UTC).timestamp()
    count = r.register_script(scripts.source("count_usage"))
    count(keys=[gen], args=Success.of(noon, images, pipeline, batch, retention_days).args())


def test_the_quota_refuses_with_its_own_problem_and_retry_after_until_midnight(api: httpx.Client,
                                                                                r: redis.Redis) -> None:
    assert create(api, {**BODY, "num_images_per_prompt": 4}, QUOTA).status_code == 202
    before = len(r.keys("sdxl:gen:*"))
    res = create(api, {**BODY, "num_images_per_prompt": 2}, QUOTA)
    body = assert_problem(res, 429, "daily-quota-exceeded", ("post", "/v1/generations"))
    assert body["title"] == "Daily image quota exceeded"
    assert "'quota' has a daily quota of 5 images" in body["detail"], body
    assert "4 already submitted today and this request asks for 2" in body["detail"], body
    wait = int(res.headers["retry-after"])
    assert abs(wait - seconds_to_next_day(dt.datetime.now(dt.UTC).timestamp())) <= 2  # the next UTC midnight
    assert body["detail"].endswith(f"in {wait} s"), body  # the same figure in words
    assert len(r.keys("sdxl:gen:*")) == before  # refused before anything was written
    assert create(api, BODY, QUOTA).status_code == 202  # the fifth image still fits
    assert_problem(create(api, BODY, QUOTA), 429, "daily-quota-exceeded")
    # other keys are not affected; a key without a quota has none
    for _ in range(3):
        assert create(api, {**BODY, "num_images_per_prompt": 4}, FREE).status_code == 202


def test_concurrent_submits_on_two_replicas_never_exceed_the_quota(api: httpx.Client, replica: httpx.Client,
                                                                    r: redis.Redis) -> None:
    clients = [api, replica] * 6
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda c: create(c, {**BODY, "num_images_per_prompt": 2}, QUOTA), clients))
    codes = sorted(a.status_code for a in answers)
    assert codes == [202, 202] + [429] * 10, codes  # 2 + 2 images fit in 5; a third request of 2 never does
    assert r.zcard(keys.owner_index(QUOTA.owner)) == 2
    report = get(api, "/v1/usage", QUOTA).json()
    assert report["quota"]["submitted_today"] == 4 and report["quota"]["remaining_today"] == 1


def test_the_caller_sees_its_own_usage_per_day(api: httpx.Client, r: redis.Redis) -> None:
    t = today()
    produced(r, QUOTA.owner, t, 1, 1.2345, 4)  # a quarter of a 4-image call: 308_625 us
    produced(r, QUOTA.owner, t, 2, 0.5, 2)
    produced(r, QUOTA.owner, t - dt.timedelta(days=2), 3, 3.0001, 3)
    produced(r, QUOTA.owner, t - dt.timedelta(days=40), 1, 9.0, 1)  # outside the default 30 days
    produced(r, FREE.owner, t, 4, 7.0, 4)  # another key's
    assert create(api, {**BODY, "num_images_per_prompt": 3}, QUOTA).status_code == 202
    res = get(api, "/v1/usage", QUOTA)
    assert res.status_code == 200, res.text
    rep = res.json()
    assert rep["key"] == "quota" and rep["retention_days"] == 90
    assert rep["to"] == t.isoformat() and rep["from"] == (t - dt.timedelta(days=29)).isoformat()
    assert [d["date"] for d in rep["days"]] == [(t - dt.timedelta(days=29 - i)).isoformat() for i in range(30)]
    last, two_back = rep["days"][-1], rep["days"][-3]
    assert last == {"date": t.isoformat(), "images": 3, "gpu_microseconds": 808_625, "gpu_seconds": 0.808625,
                    "generations": 2, "images_submitted": 3}
    assert (two_back["images"], two_back["gpu_microseconds"], two_back["images_submitted"]) == (3, 3_000_100, 0)
    assert rep["totals"] == {"images": 6, "gpu_microseconds": 3_808_725, "gpu_seconds": 3.808725,
                             "generations": 3, "images_submitted": 3}
    assert rep["quota"]["daily_images"] == 5 and rep["quota"]["remaining_today"] == 2
    assert rep["quota"]["resets_at"] == f"{(t + dt.timedelta(days=1)).isoformat()}T00:00:00.000Z"
    # a range reaching back further
    old = t - dt.timedelta(days=40)
    rep = get(api, "/v1/usage", QUOTA, **{"from": old.isoformat(), "to": old.isoformat()}).json()
    assert rep["days"] == [{"date": old.isoformat(), "images": 1, "gpu_microseconds": 9_000_000, "gpu_seconds": 9.0,
                            "generations": 1, "images_submitted": 0}]
    # the other key sees its own, and has no quota
    rep = get(api, "/v1/usage", FREE).json()
    assert rep["totals"]["images"] == 4 and rep["quota"] is None


def test_usage_ranges_are_checked(api: httpx.Client) -> None:
    t = today()
    for params, field in (({"from": (t - dt.timedelta(days=90)).isoformat()}, "from"),
                          ({"to": (t + dt.timedelta(days=1)).isoformat()}, "to"),
                          ({"from": t.isoformat(), "to": (t - dt.timedelta(days=1)).isoformat()}, "from"),
                          ({"from": "yesterday"}, "from")):
        body = assert_problem(get(api, "/v1/usage", QUOTA, **params), 422, "validation-error", ("get", "/v1/usage"))
        assert [e["field"] for e in body["errors"]] == [field], body
    oldest = (t - dt.timedelta(days=89)).isoformat()
    assert get(api, "/v1/usage", QUOTA, **{"from": oldest}).json()["from"] == oldest
    assert_problem(api.get("/v1/usage"), 401, "unauthorized", ("get", "/v1/usage"))


def test_open_mode_counts_for_the_open_principal_and_the_default_quota_applies(
        make_api: Callable[..., httpx.Client], r: redis.Redis) -> None:
    open_api = make_api(default_daily_image_quota=2, usage_retention_days=7)
    assert create(open_api, {**BODY, "num_images_per_prompt": 2}).status_code == 202
    assert_problem(create(open_api, BODY), 429, "daily-quota-exceeded")
    produced(r, "open", today(), 2, 0.75, 2, retention_days=7)
    rep = get(open_api, "/v1/usage").json()
    assert rep["key"] == "open" and rep["retention_days"] == 7 and len(rep["days"]) == 7
    assert rep["totals"]["gpu_microseconds"] == 750_000 and rep["quota"]["remaining_today"] == 0
    day = keys.usage_day("open", today().isoformat())
    left = day_expires_at(today().isoformat(), 7) - dt.datetime.now(dt.UTC).timestamp()
    assert 6 * 86400 < r.ttl(day) <= left + 1  # the day's figures go once it is 7 days old


def test_metrics_show_usage_per_key_name(api: httpx.Client, r: redis.Redis) -> None:
    produced(r, QUOTA.owner, today(), 2, 1.5, 2)
    produced(r, QUOTA.owner, today() - dt.timedelta(days=1), 1, 0.25, 1)
    produced(r, FREE.owner, today(), 1, 0.5, 2)
    text = api.get("/metrics").text
    assert 'sdxl_usage_images_total{key="quota"} 3.0' in text
    assert 'sdxl_usage_gpu_seconds_total{key="quota"} 1.75' in text
    assert 'sdxl_usage_images_total{key="free"} 1.0' in text
    assert 'sdxl_usage_gpu_seconds_total{key="free"} 0.25' in text


def test_the_key_tool_sets_a_keys_daily_quota(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.json"
    assert apikeys.main(["create", "team-a", "--daily-image-quota", "100", "--file", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entry"]["daily_image_quota"] == 100
    assert apikeys.main(["set", "team-a", "--daily-image-quota", "0", "--file", str(path)]) == 0
    assert json.loads(path.read_text())[0]["daily_image_quota"] == 0
    assert apikeys.main(["set", "team-a", "--daily-image-quota", "-1", "--file", str(path)]) == 2
    assert "daily_image_quota" in capsys.readouterr().err
    assert apikeys.main(["set", "nobody", "--burst", "3", "--file", str(path)]) == 1


def test_openai_routes_count_n_against_the_quota_in_openai_error_shape(api: httpx.Client) -> None:
    body = {"prompt": "counted", "n": 4, "size": "256x256", "response_format": "b64_json"}
    assert create(api, {**BODY, "num_images_per_prompt": 2}, QUOTA).status_code == 202
    res = api.post("/v1/images/generations", json=body, headers=QUOTA.headers)  # 2 + 4 > 5: refused at submit
    assert res.status_code == 429, res.text
    error = res.json()["error"]
    assert error["code"] == "insufficient_quota" and "this request asks for 4" in error["message"], error
    assert int(res.headers["retry-after"]) >= 1
