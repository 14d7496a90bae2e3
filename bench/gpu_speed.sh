#!/usr/bin/env bash
# Part 2 of the GPU checks, in one device call: base + refiner at 1024 px, 30 steps (goal <= 0.9 s on an H100 or
# H200), each speed option on and off on the same seed, with its divergence from fp16 eager (bench/gpu_speed.py):
# max-autotune with CUDA graphs, fused QKV, a compiled VAE decode, FP8 (opt-in), then all exact ones together.
# They run in that order while the time budget lasts; what did not fit is named in the output, for a second call.
# Results, named <date>_<commit>_<gpu>-speed..., go to $OUT as they are written.
#
#   bash bench/gpu_prepare.sh                 # here, first (wheels: diffusers, torchao, pydantic, ...)
#   device run: command "bash bench/gpu_speed.sh", carry [".whl", ".gpu"], timeout_s 400
#   device run: command "CASES=fp8,all_exact bash bench/gpu_speed.sh", ...   # the cases the first call skipped
#   DRY_RUN=1 bash bench/gpu_speed.sh         # here, on the CPU: the tiny model, into bench/results/
#
# DEADLINE_S (default 380): the script stops itself by then; BUDGET_S (default DEADLINE_S - 30): no case starts
# that would not end by then.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
# shellcheck source=bench/gpu_setup.sh
source bench/gpu_setup.sh
deadline=${DEADLINE_S:-380}
name=speed
args=()
if [ -n "${CASES:-}" ]; then
  args+=(--cases "$CASES")
  name=speed-$(echo "$CASES" | tr ',_' '--')
fi
if [ -n "$dry" ]; then
  args+=("$dry")
else
  args+=(--budget-s "$(left "${BUDGET_S:-$((deadline - 30))}")")
fi
log="$out/${prefix}-${name}-log.txt"
versions 2>&1 | tee "$log"
timeout --kill-after=15 "$(left "$deadline")" "$PY" bench/gpu_speed.py "${args[@]}" 2>>"$log" \
  | grep --line-buffered '^{' | tee "$out/${prefix}-${name}.jsonl"
rc=${PIPESTATUS[0]}
echo "## done in $((SECONDS - started)) s: rc=$rc; files in $out:" | tee -a "$log"
find "$out" -maxdepth 1 -name "$prefix*" -printf "%10s %p\n" | tee -a "$log"
[ "$rc" = 0 ]
