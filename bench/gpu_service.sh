#!/usr/bin/env bash
# Part 1 of the GPU checks, in one device call: the whole service on the GPU.
#   1. installs what the device lacks (the wheels and redis-server that bench/gpu_prepare.sh gathered here);
#   2. the GPU-marked tests (every test file with `pytest.mark.gpu`);
#   3. bench/gpu_service.py: redis-server, the API, the dispatcher and one worker on the full-size random-weight SDXL
#      (fp16, base + refiner, built on the GPU, compiled in the default mode): cold start, end to end over the
#      pipeline at 1024 px / 30 steps, 8 clients, SDXL_BATCH_MAX=4 over 1, VRAM.
# Results, named <date>_<commit>_<gpu>-..., go to $OUT as they are written: what finished before a limit is kept.
#
#   bash bench/gpu_prepare.sh                 # here, first
#   device run: command "bash bench/gpu_service.sh", timeout_s 420,
#               carry [".whl", ".gpu", ".models/tiny"]
#   DRY_RUN=1 bash bench/gpu_service.sh       # here, on the CPU: the tiny model, into bench/results/
#
# DEADLINE_S (default 400) is when the script stops itself, so that it ends inside the call's timeout.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
# shellcheck source=bench/gpu_setup.sh
source bench/gpu_setup.sh
deadline=${DEADLINE_S:-400}
log="$out/${prefix}-service-log.txt"
versions 2>&1 | tee "$log"

mapfile -t gpu_tests < <(grep -rl --include='test_*.py' 'pytest.mark.gpu' tests | sort)
echo "## GPU tests: ${gpu_tests[*]}" | tee -a "$log"
timeout "$(left 150)" "$PY" -m pytest -p no:cacheprovider -q -m gpu "${gpu_tests[@]}" 2>&1 \
  | tee "$out/${prefix}-gpu-tests.txt"
tests_rc=${PIPESTATUS[0]}

echo "## service ($(left "$deadline") s left)" | tee -a "$log"
# SIGTERM at the deadline: the benchmark stops its processes and still writes its summary line
timeout --kill-after=15 "$(left "$deadline")" "$PY" bench/gpu_service.py ${dry:+"$dry"} 2>>"$log" \
  | grep --line-buffered '^{' | tee "$out/${prefix}-service.jsonl"
bench_rc=${PIPESTATUS[0]}
echo "## done in $((SECONDS - started)) s: tests rc=$tests_rc, service rc=$bench_rc; files in $out:" | tee -a "$log"
find "$out" -maxdepth 1 -name "$prefix*" -printf "%10s %p\n" | tee -a "$log"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
