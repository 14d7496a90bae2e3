#!/usr/bin/env bash
# One GPU session's checks, in one go: the GPU-marked tests, then the pipeline table on the full-size
# random-weight SDXL (1024 px, 30 steps). Each part logs to $OUT (or ./gpu-out) as it goes, so whatever
# finished before a time limit is kept. Uses the machine's own python3 (torch with CUDA); if a .whl/
# folder of wheels is present (diffusers, pydantic, ... where the machine lacks them) they are installed
# into /tmp/site first.
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import sys, torch, diffusers, transformers, pydantic; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__, "transformers", transformers.__version__, "pydantic", pydantic.__version__)'
} 2>&1 | tee "$out/versions.txt"
# conftest.py pulls in the service's test fixtures (Redis, FastAPI, ...); the GPU tests need none of them
python3 -m pytest --noconftest -p no:cacheprovider -q -m gpu tests/unit/test_models.py 2>&1 | tee "$out/gpu_tests.txt"
python3 bench/pipeline.py --runs "${RUNS:-3}" 2>&1 | tee "$out/pipeline.jsonl"
