"""`make bench`: the CPU benchmarks one after another, every JSON line passed through, then one summary line.

Runs overhead, throughput, submit and batching (each starts and stops its own Redis, API and workers), then
the pipeline table on the tiny model (`bench/pipeline.py --model tiny --skip-compile --runs 1`) and the PNG
encoders (`bench/encode.py`). The load run
is separate (`make load`, or `--with-load` here). The GPU table is not run here: see BENCHMARKS.md.

    python bench/run_all.py                  # full counts (about 15-30 minutes on 2 cores)
    python bench/run_all.py --quick          # smoke: small counts, 128 px, 4 steps
    python bench/run_all.py --only overhead,submit
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL: dict[str, list[str]] = {
    "overhead": [],
    "throughput": [],
    "submit": [],
    "batching": [],
    "pipeline": ["--model", "tiny", "--skip-compile", "--runs", "1"],
    "encode": [],
    "load": [],
}
QUICK: dict[str, list[str]] = {
    "overhead": ["--n", "5", "--warmup", "1", "--size", "128", "--steps", "4"],
    "throughput": ["--total", "8", "--baseline-n", "3", "--size", "128", "--steps", "4"],
    "submit": ["--duration", "2", "--warmup", "0.5"],
    "batching": ["--requests", "8", "--size", "128", "--steps", "4", "--rounds", "1"],
    "pipeline": ["--model", "tiny", "--skip-compile", "--runs", "1", "--size", "128", "--steps", "4"],
    "encode": ["--sizes", "256", "--runs", "2"],
    "load": ["--requests", "100", "--clients", "16"],
}
DEFAULT = ["overhead", "throughput", "submit", "batching", "pipeline", "encode"]


def run(name: str, extra: list[str]) -> tuple[int, dict[str, object] | None, float]:
    t0 = time.monotonic()
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if name == "pipeline":  # one torch thread, like the service benchmarks' worker (BENCHMARKS.md says why)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", "1")
    proc = subprocess.Popen(
        [sys.executable, str(HERE / f"{name}.py"), *extra], stdout=subprocess.PIPE, text=True, cwd=HERE.parent, env=env
    )
    summary = None
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("event") == "summary":
            summary = row
    return proc.wait(), summary, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke-test counts")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(FULL)}")
    ap.add_argument("--with-load", action="store_true", help="also run bench/load.py (make load runs it alone)")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else DEFAULT + (["load"] if args.with_load else [])
    unknown = [n for n in names if n not in FULL]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(FULL)}")
    table = QUICK if args.quick else FULL
    summaries: dict[str, object] = {}
    failed: list[str] = []
    for name in names:
        rc, summary, seconds = run(name, table[name])
        summaries[name] = {"rc": rc, "seconds": round(seconds, 1), "summary": summary}
        if rc != 0:
            failed.append(name)
    print(json.dumps({"event": "run_all", "quick": args.quick, "failed": failed, "results": summaries}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
