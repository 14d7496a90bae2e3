"""Usage accounting (common/usage.py, common/lua/succeed.lua, create.lua's quota): the arithmetic, the UTC days,
and the counting scripts on a real Redis driven by the worker's runner (stand-in engine): a success counts once,
in its own transition; a refused, repeated, canceled or failed finish counts nothing; the quota holds under
concurrent submits."""

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aredis
from PIL import Image

from app.enqueue import Enqueuer
from app.errors import Problem
from app.settings import Settings
from app.usage import date_range
from common.contract import keys
from common.contract.events import EventType
from common.contract.params import GenerationParams
from common.contract.status import ErrorType
from common.usage import DayUsage, Success, day_expires_at, gpu_share_us, seconds_to_next_day, utc_day
from tests.unit.test_runner_oom import record
from tests.unit.test_state import encoded, started
from worker.pipeline import StageTimes

NOON = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC).timestamp()
# a finish on a day other than the submit's (today): its counts land on that day's hash alone
EARLIER = dt.datetime.now(dt.UTC).timestamp() - 3 * 86400


def test_a_calls_time_is_split_evenly_over_its_images_in_whole_microseconds() -> None:
    assert gpu_share_us(2.4, 1, 1) == 2_400_000
    assert gpu_share_us(1.2345, 1, 4) == 308_625  # 1_234_500 us over 4 images, one of them
    assert gpu_share_us(1.2345, 2, 4) == 617_250
    shares = [gpu_share_us(0.0001, n, 3) for n in (1, 1, 1)]  # 100 us over 3: floor, never more than the call
    assert shares == [33, 33, 33] and sum(shares) <= 100
    assert gpu_share_us(0.25, 3, 3) == 250_000


def test_utc_days_their_expiry_and_the_next_midnight() -> None:
    assert utc_day(NOON) == "2026-12-07"
    assert utc_day(dt.datetime(2026, 12, 7, 23, 59, 59, tzinfo=dt.UTC).timestamp()) == "2026-12-07"
    assert utc_day(dt.datetime(2026, 12, 8, 0, 0, tzinfo=dt.UTC).timestamp()) == "2026-12-08"
    # a day's figures go once it has left the last 90 days: at the start of day 90 after it
    assert day_expires_at("2026-12-07", 90) == dt.datetime(2027, 3, 7, tzinfo=dt.UTC).timestamp()
    assert seconds_to_next_day(NOON) == 12 * 3600
    assert seconds_to_next_day(dt.datetime(2026, 12, 7, 23, 59, 59, 500000, tzinfo=dt.UTC).timestamp()) == 1


def test_the_range_a_usage_request_may_ask_for() -> None:
    today = dt.date(2026, 12, 7)
    assert date_range(None, None, today, 90) == (dt.date(2026, 11, 8), today)  # the last 30 days
    assert date_range(None, None, today, 7) == (dt.date(2026, 12, 1), today)  # never before what is kept
    assert date_range(dt.date(2026, 9, 9), dt.date(2026, 9, 30), today, 90) == (dt.date(2026, 9, 9),
                                                                                 dt.date(2026, 9, 30))
    for first, last, field, value in ((dt.date(2026, 9, 8), None, "from", "2026-09-08"),
                                      (None, dt.date(2026, 12, 8), "to", "2026-12-08"),
                                      (None, dt.date(2026, 9, 8), "to", "2026-09-08"),
                                      (dt.date(2026, 12, 6), dt.date(2026, 12, 5), "from", "2026-12-06")):
        with pytest.raises(Problem) as exc:
            date_range(first, last, today, 90)
        assert exc.value.status == 422 and exc.value.errors == [
            {"field": field, "message": exc.value.errors[0]["message"], "value": value}]  # type: ignore[index]


def usage_of(r: redis.Redis, owner: str, day: str) -> DayUsage:
    return DayUsage.parse(day, r.hgetall(keys.usage_day(owner, day)))


def today() -> str:
    return utc_day(dt.datetime.now(dt.UTC).timestamp())


def test_a_success_counts_its_share_once_in_its_own_transition(redis_client: Any, tmp_path: Path) -> None:
    runner, m = started(redis_client, tmp_path)
    encoded(runner, m)
    # a call of 4 images that took 0.25 s (recorded as 0.25): this one-image generation's share is 62_500 us
    runner.store_and_finish(m, [Image.new("RGB", (64, 64))], runner.manifest(m.payload.params), 0.25,
                            StageTimes(base=0.2, refiner=0.0, decoding=0.05), batch_images=4)
    rec = record(redis_client, m.gen_id)
    assert rec["status"] == "succeeded" and rec["timings"]["gpu_seconds"] == 0.0625
    day = usage_of(redis_client, "open", utc_day(float(rec["finished_at"])))
    assert (day.images, day.gpu_us, day.generations, day.admitted) == (1, 62_500, 1, 1)
    assert redis_client.hget(keys.USAGE_IMAGES, "open") == b"1"
    assert redis_client.hget(keys.USAGE_GPU_US, "open") == b"62500"
    # the day's figures expire with the retention (90 days by default)
    ttl = redis_client.ttl(keys.usage_day("open", day.day))
    assert 89 * 86400 < ttl <= 90 * 86400
    # the same finish again (a retry whose first answer was lost): refused by the compare-and-set, nothing counted
    usage = Success.of(float(rec["finished_at"]), 1, 0.25, 4, 90)
    for exact in (True, False):  # the owner's record as known, and read back from the hash
        m.record_exact = exact
        assert runner.state.finish(m, {"status": "succeeded"}, EventType.succeeded, usage) == "succeeded"
    assert usage_of(redis_client, "open", day.day) == day
    assert redis_client.hget(keys.USAGE_GPU_US, "open") == b"62500"


def test_a_finish_from_the_hash_counts_too(redis_client: Any, tmp_path: Path) -> None:
    runner, m = started(redis_client, tmp_path)
    m.record_exact = False  # a lost answer: finish goes through succeed_read.lua
    usage = Success.of(EARLIER, 2, 1.5, 2, 90)
    assert runner.state.finish(m, {"status": "succeeded", "finished_at": EARLIER}, EventType.succeeded,
                               usage) == "OK"
    assert usage_of(redis_client, "open", usage.day) == DayUsage(usage.day, 2, 1_500_000, 1, 0)


@pytest.mark.parametrize("ending", ["stale", "canceled", "failed"])
def test_no_usage_without_a_stored_success(redis_client: Any, tmp_path: Path, ending: str) -> None:
    runner, m = started(redis_client, tmp_path)
    encoded(runner, m)
    usage = Success.of(EARLIER, 1, 0.5, 1, 90)
    if ending == "stale":  # handed to another attempt meanwhile: this worker's finish is refused
        redis_client.hset(keys.generation(m.gen_id), "token", "another-attempt")
        assert runner.state.finish(m, {"status": "succeeded"}, EventType.succeeded, usage).startswith("stale")
    elif ending == "canceled":
        redis_client.hset(keys.generation(m.gen_id), "status", "canceled")
        assert runner.state.finish(m, {"status": "succeeded"}, EventType.succeeded, usage) == "canceled"
    else:
        runner.fail_all([m], ErrorType.pipeline_error, "boom")
        assert record(redis_client, m.gen_id)["status"] == "failed"
    assert not redis_client.exists(keys.usage_day("open", usage.day), keys.USAGE_IMAGES, keys.USAGE_GPU_US)
    assert usage_of(redis_client, "open", today()) == DayUsage(today(), admitted=1)  # only its submit counted


def test_the_daily_quota_holds_under_concurrent_submits(redis_server: Any, redis_client: redis.Redis) -> None:
    params = GenerationParams(prompt="p", width=64, height=64, num_inference_steps=2, guidance_scale=5.0, seed=1,
                              num_images_per_prompt=2)

    async def run() -> list[tuple[int, int]]:
        ar = aredis.Redis.from_url(redis_server.url)
        try:
            enq = Enqueuer(redis_client, Settings(), ar)

            async def one(p: GenerationParams) -> tuple[int, int]:
                fields, ks, args = enq.prepare(p, "key:q", limits=(100, 1000), daily_quota=5)
                sub = await enq.submit_async(fields, ks, args)
                return sub.admitted, sub.count

            concurrent = await asyncio.gather(*(one(params) for _ in range(8)))
            one_more = params.model_copy(update={"num_images_per_prompt": 1})
            return [*concurrent, await one(one_more), await one(one_more)]
        finally:
            await ar.aclose()

    answers = asyncio.run(run())
    assert sorted(a for a, _ in answers[:8]) == [0, 0] + [3] * 6  # two requests of 2 fit in 5, the rest refused
    assert all(count == 4 for code, count in answers[:8] if code == 3)  # the refusal says what was admitted
    assert answers[8][0] == 0 and answers[9] == (3, 5)  # the fifth image fits, a sixth does not
    assert usage_of(redis_client, "key:q", today()).admitted == 5
    assert len(redis_client.keys("sdxl:gen:*")) == 3  # a refused submit writes nothing
    assert redis_client.zcard(keys.active("key:q")) == 3
