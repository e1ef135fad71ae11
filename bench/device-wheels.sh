#!/usr/bin/env bash
# Prepares .whl/ (git-ignored) with the wheels bench/device.sh installs on the GPU machine, which has torch,
# safetensors, numpy, pillow, tokenizers, transformers, huggingface-hub, regex, requests, httpx, anyio, h11,
# click and zipp but not these (see the device tool's KINDS.md). Pure-Python wheels for CPython 3.12 on
# manylinux x86_64, no dependencies resolved: each needed one is named here. Run once, here, from anywhere:
#
#     bash bench/device-wheels.sh          # then name .whl in the device run's `carry`
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' .gitignore || echo /.whl/ >> .git/info/exclude
WHEELS=(
  ftfy==6.3.1 wcwidth==0.7.0                      # the CLIP tokenizer's text clean-up (a runtime dependency)
  diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer  # the reference rows of bench/gpu.py
  starlette==1.10.0 uvicorn==0.54.0               # so the server's test files collect
)
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
# one version of each package, or the install on the device stops
dups=$(ls .whl/*.whl | xargs -n1 basename | sed 's/-[0-9].*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dups" ]; then echo "two versions of: $dups (delete the older from .whl/)" >&2; exit 1; fi
du -sh .whl && ls .whl
