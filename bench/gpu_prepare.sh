#!/usr/bin/env bash
# Run HERE (the CPU machine, with PyPI), before bench/gpu_service.sh or bench/gpu_speed.sh runs on the device
# machine. It gathers what that machine lacks, into ignored folders that the device call carries:
#
#   .whl/  wheels for CPython 3.12 (the device's python3), pinned to this project's versions: diffusers, the API's
#          and the worker's service packages (fastapi, pydantic, redis, rq, ...), torchao for SDXL_FP8. The device's
#          image already has torch, transformers, accelerate, safetensors, huggingface-hub, tokenizers, httpx,
#          pillow, numpy, prometheus-client (../.library/device/KINDS.md lists it); these are not carried.
#   .gpu/  redis.tar.gz: redis-server 7.0.15 (this machine's Debian build, the version the tests use; the device
#          has none, and the PyPI packages that ship one carry Redis 6.0/6.2) with the shared libraries it links
#          beyond glibc and a wrapper that uses them only where the device's own fail; and `commit`, which the
#          results are named by (the device's copy of the tree has no .git).
#   .models/tiny  the tiny model (the API reads its tokenizers; the GPU tests run on it); built here if missing.
#
#   bash bench/gpu_prepare.sh        # then the device calls it prints (command, carry list, timeout)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}

# never committed: .whl and .gpu are listed in this clone's own exclude file (.models is in .gitignore)
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for d in /.whl/ /.gpu/; do grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >>"$exclude"; done

# pinned as in pyproject.toml (and, for their own dependencies, as this machine's venv has them)
wheels=(
  diffusers==0.42.1 importlib-metadata==10.2.0 zipp==4.1.2 lazy-importer==0.1.0
  fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2 python-multipart==0.0.34
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0
  typing-inspection==0.4.5 typing-extensions==4.16.0
  redis==8.1.0 hiredis==3.5.0 rq==3.0.0 croniter==7.0.0 tenacity==9.2.1 standardwebhooks==1.1.0
  uvicorn==0.54.0 zlib-ng==1.1.0
  torchao==0.18.0  # built against torch 2.11, the device's
)
mkdir -p .whl
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${wheels[@]}"

# redis-server: the real binary behind Debian's symlink (it serves when called by the name redis-server), packed
# with its libraries into .gpu/redis.tar.gz (6 MB instead of 14), unpacked on the device by bench/gpu_setup.sh
rm -rf .gpu && mkdir -p .gpu
stage=$(mktemp -d)
mkdir -p "$stage/redis/lib" "$stage/bin"
cp "$(readlink -f "$(command -v redis-server)")" "$stage/redis/redis-server"
ldd "$stage/redis/redis-server" | awk '$3 ~ /^\// {print $3}' | while read -r lib; do
  case $(basename "$lib") in libc.so.*|libm.so.*|ld-linux*) ;; *) cp -L "$lib" "$stage/redis/lib/" ;; esac
done
cat >"$stage/bin/redis-server" <<'EOF'
#!/bin/sh
# the carried redis-server: with the device's own libraries where they work, else with the carried ones
d=$(dirname "$0")/../redis
if "$d/redis-server" --version >/dev/null 2>&1; then exec "$d/redis-server" "$@"; fi
LD_LIBRARY_PATH="$d/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$d/redis-server" "$@"
EOF
chmod +x "$stage/bin/redis-server"
"$stage/bin/redis-server" --version
tar czf .gpu/redis.tar.gz -C "$stage" redis bin
rm -rf "$stage"

# the tiny model (carried too: the API reads its tokenizers, the GPU tests run on it; building it there would
# depend on the device's transformers)
[ -e .models/tiny/base/model_index.json ] && [ -e .models/tiny/refiner/model_index.json ] \
  || HF_HUB_OFFLINE=1 .venv/bin/python -m tools.models build-tiny .models/tiny

# the results' names carry the commit; "-dirty" marks uncommitted changes to tracked files (a "+" would keep
# the device tool from bringing the files back: it takes letters, digits, ".", "_" and "-" only)
commit=$(git rev-parse --short HEAD)
git diff --quiet HEAD -- . ':!bench/results' || commit="$commit-dirty"
echo "$commit" >.gpu/commit

total=$(du -cb .whl .gpu .models/tiny | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "carried: $(du -sh .whl | cut -f1) wheels ($(find .whl -name '*.whl' | wc -l) files), $(du -sh .gpu | cut -f1) redis," \
  "$(du -csh .models/tiny | tail -1 | cut -f1) tiny model; with the" \
  "tracked tree $(( (total + tree) / 1048576 )) MiB of the device call's 64 MiB; commit $commit"
cat <<EOF
device calls (one each; the second only for what the first could not fit, or to rerun):
  run  command: "bash bench/gpu_service.sh"  carry: [".whl", ".gpu", ".models/tiny"]  timeout_s: 420
  run  command: "bash bench/gpu_speed.sh"    carry: [".whl", ".gpu"]  timeout_s: 400
  run  command: "CASES=<the skipped ones> bash bench/gpu_speed.sh"  carry: [".whl", ".gpu"]  timeout_s: 400
then copy the files it brings back into bench/results/ (they are already named by date, commit and GPU).
EOF
