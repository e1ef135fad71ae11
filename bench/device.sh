#!/usr/bin/env bash
# The whole GPU check in one device `run` call, written so that it always reports.
#
#   run(command="bash bench/device.sh", carry=[".whl"], timeout_s=600)      # on the lent GPU machine
#   OUT=/tmp/devout bash bench/device.sh --quick                            # here, on the CPU: seconds
#
# Steps, each under its own `timeout` inside a wall budget (BUDGET seconds, default 540, well inside the
# device tool's 600 s per command):
#   env        python, torch, GPU name, which optional packages import
#   wheels     pip-installs the carried wheels in .whl/ (bench/device-wheels.sh) into /tmp/sd15-site
#   ckpt       ONE synthetic checkpoint (tests/synthetic.py; full-size fp16, tiny in --quick) for every step
#   pytest     python -m pytest -m gpu (the full-size tests read that checkpoint through SD15_FULL_CKPT)
#   overhead   bench/sampler_overhead.py: per-step CPU cost and device reads of the sampling loop
#   bench      bench/gpu.py --ckpt <that file> --deadline …: UNet it/s, end to end, peak VRAM
# $OUT/device.json is rewritten after every step (status, exit code, seconds, the log's last lines);
# bench/gpu.py rewrites $OUT/gpu.json after every row; $OUT/device.log has every step's output,
# $OUT/pytest.xml the per-test results, $OUT/overhead.md the overhead table. A step that runs out of
# time is killed and recorded as such, and the next step still runs if time is left.
#
# Options: --quick (tiny checkpoint, small sizes; the script's own end-to-end check); env BUDGET,
# COMPILE_MODE (bench/gpu.py --compile-mode), GPU_ARGS (more bench/gpu.py arguments), PYTHON.
set -u
cd "$(dirname "$0")/.."
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
OUT=${OUT:-/tmp/sd15-device}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-540}
START=$(date +%s)
WORK=$(mktemp -d /tmp/sd15-device.XXXXXX)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
: > "$OUT/device.log"
echo '{"steps": []}' > "$OUT/device.json"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

record() {  # record NAME STATUS RC SECONDS [NOTE]: append one step to device.json (rewritten atomically)
  NAME=$1 STATUS=$2 RC=$3 SECS=$4 NOTE=${5:-} LOG="$WORK/$1.log" DJSON="$OUT/device.json" QUICK=$QUICK "$PY" - <<'EOF'
import json, os
path = os.environ["DJSON"]
data = json.load(open(path))
tail = ""
if os.path.exists(os.environ["LOG"]):
    tail = "".join(open(os.environ["LOG"], errors="replace").readlines()[-25:])
data["quick"] = os.environ["QUICK"] == "1"
data["steps"].append({"step": os.environ["NAME"], "status": os.environ["STATUS"], "rc": int(os.environ["RC"]),
                      "seconds": int(os.environ["SECS"]), "note": os.environ["NOTE"], "log_tail": tail})
json.dump(data, open(path + ".tmp", "w"), indent=1)
os.replace(path + ".tmp", path)
EOF
}

step() {  # step NAME LIMIT CMD...: run CMD under min(LIMIT, time left - 5 s), log it, record it
  local name=$1 limit=$2 rc t0 l status
  shift 2
  l=$(( $(left) - 5 ))
  if [ "$l" -lt 15 ]; then
    record "$name" skipped -1 0 "out of time: ${l}s left of the ${BUDGET}s budget"
    return 1
  fi
  [ "$limit" -gt "$l" ] && limit=$l
  echo "=== $name (limit ${limit}s) $(date -u +%T)" | tee -a "$OUT/device.log"
  t0=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  cat "$WORK/$name.log" >> "$OUT/device.log"
  case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
  record "$name" "$status" "$rc" $(( $(date +%s) - t0 )) "limit ${limit}s"
  echo "=== $name: $status (rc $rc, $(( $(date +%s) - t0 ))s)" | tee -a "$OUT/device.log"
  return $rc
}

# --- env ------------------------------------------------------------------------------------------
step env 30 bash -c "uname -m; $PY --version; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3;
  $PY - <<'EOF'
import importlib, torch
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')
for m in ('safetensors', 'numpy', 'PIL', 'tokenizers', 'ftfy', 'diffusers', 'transformers', 'starlette', 'pytest', 'pytest_timeout'):
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, '__version__', 'ok'))
    except Exception as e:
        print(m, 'MISSING', type(e).__name__, e)
EOF"

# --- wheels (what the device lacks) ----------------------------------------------------------------
if ls .whl/*.whl > /dev/null 2>&1; then
  SITE=${SITE:-/tmp/sd15-site}
  if step wheels 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target "$SITE" .whl/*.whl; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  record wheels skipped -1 0 "no .whl/ folder (bench/device-wheels.sh makes it; name .whl in carry)"
fi

# --- one synthetic checkpoint ------------------------------------------------------------------------
if [ $QUICK = 1 ]; then
  CKPT="$WORK/tiny.safetensors"
  step ckpt 60 "$PY" tests/synthetic.py --kind tiny --out "$CKPT"
else
  CKPT="$WORK/sd15-synth-fp16.safetensors"
  step ckpt 150 "$PY" tests/synthetic.py --kind sd15 --dtype float16 --out "$CKPT" && export SD15_FULL_CKPT="$CKPT"
fi

# --- pytest -m gpu -------------------------------------------------------------------------------------
PYTEST_ARGS=(-m gpu -q -rs -p no:cacheprovider --junitxml="$OUT/pytest.xml")
"$PY" -c "import pytest_timeout" 2> /dev/null && PYTEST_ARGS+=(--timeout=150)
step pytest $([ $QUICK = 1 ] && echo 120 || echo 210) "$PY" -m pytest "${PYTEST_ARGS[@]}"

# --- sampling loop overhead -----------------------------------------------------------------------------
if [ $QUICK = 1 ]; then
  step overhead 90 "$PY" bench/sampler_overhead.py --size 64 --steps 4 --repeats 1 --samplers "Euler,DDIM"
else
  step overhead 60 "$PY" bench/sampler_overhead.py --device cuda --steps 20 --repeats 3 \
    --samplers "Euler,Euler a,DPM++ 2M,DDIM,UniPC"
fi
cp "$WORK/overhead.log" "$OUT/overhead.md" 2> /dev/null

# --- bench/gpu.py -----------------------------------------------------------------------------------------
GPU=(bench/gpu.py --ckpt "$CKPT" --json "$OUT/gpu.json")
[ -n "${COMPILE_MODE:-}" ] && GPU+=(--compile-mode "$COMPILE_MODE")
if [ $QUICK = 1 ]; then
  GPU+=(--size 64 --steps 1 --iters 1 --repeats 1 --warmup 1 --no-compile)
fi
L=$(( $(left) - 10 ))
step bench "$L" "$PY" "${GPU[@]}" --deadline $(( L - 60 > 30 ? L - 60 : 30 )) ${GPU_ARGS:-}

record done ok 0 $(( $(date +%s) - START )) "total"
rm -rf "$WORK"
echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
