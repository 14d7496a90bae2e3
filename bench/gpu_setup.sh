# Sourced by bench/gpu_service.sh and bench/gpu_speed.sh (not run by itself). Sets:
#   PY      the python to use: the device's python3 (torch with CUDA); with DRY_RUN=1 this checkout's .venv
#   out     where results go: $OUT on the device machine, bench/results in a dry run, else ./gpu-out
#   prefix  the results' common name, <date>_<commit>_<gpu>: e.g. 2026-12-05_abc1234_h100 (cpu-dry-run: dry run)
#   dry     "--dry-run" in a dry run, else empty
# and on the device installs the carried wheels (.whl, into /tmp/site) and puts the carried redis-server on PATH
# (.gpu/redis.tar.gz, from bench/gpu_prepare.sh).
# shellcheck shell=bash disable=SC2034  # the variables are the caller's
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
started=$SECONDS
if [ "${DRY_RUN:-0}" = 1 ]; then
  PY=${PYTHON:-.venv/bin/python}
  out=${OUT:-bench/results}
  gpu=cpu-dry-run
  dry=--dry-run
else
  PY=${PYTHON:-python3}
  out=${OUT:-gpu-out}
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | awk '{print tolower($2)}')
  gpu=${gpu:-nogpu}
  dry=
  if compgen -G ".whl/*.whl" >/dev/null; then
    # a warm machine keeps /tmp/site from the call before: install once per set of wheels
    stamp=/tmp/site/.installed-$(printf '%s\n' .whl/*.whl | cksum | cut -d' ' -f1)
    if [ ! -e "$stamp" ]; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed" >&2; exit 3; }
      touch "$stamp"
    fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
mkdir -p "$out"
if [ -e .gpu/redis.tar.gz ]; then
  mkdir -p /tmp/sdxl-redis
  if ! { tar xzf .gpu/redis.tar.gz -C /tmp/sdxl-redis && /tmp/sdxl-redis/bin/redis-server --version >/dev/null; }; then
    echo "the carried redis-server does not run here" >&2
    exit 3
  fi
  export PATH="/tmp/sdxl-redis/bin:$PATH"
fi
if [ -n "$dry" ]; then
  commit=$(git rev-parse --short HEAD)  # here: the checkout itself
else
  commit=$(cat .gpu/commit 2>/dev/null || echo unknown)  # the device's copy has no .git: bench/gpu_prepare.sh wrote it
fi
prefix="$(date -u +%Y-%m-%d)_${commit}_${gpu}"

# seconds left before `deadline` (from the start of the calling script)
left() { echo $(( $1 - (SECONDS - started) )); }

versions() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  command -v redis-server >/dev/null && redis-server --version
  "$PY" -c 'import sys, torch, diffusers, transformers, pydantic, fastapi, rq
try:
    import torchao; ao = torchao.__version__
except ImportError:
    ao = None
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "diffusers", diffusers.__version__, "transformers", transformers.__version__, "pydantic", pydantic.__version__,
      "fastapi", fastapi.__version__, "rq", rq.__version__, "torchao", ao)' 2>&1 | grep -v '^\[transformers\]'
}
