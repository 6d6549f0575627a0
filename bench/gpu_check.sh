#!/usr/bin/env bash
# The GPU figures of issues 4 and 5 in one go, on a single-GPU machine with torch but no Ray.
#
#   bash ../shared/gpu-host/make-ray-bundle.sh   # once, on a machine with pip: builds .devcarry/
#   bash bench/gpu_check.sh                      # on the GPU machine, from the repo root
#
# Starts a one-node Ray head from .devcarry/ (token auth off: a throwaway local cluster), then
# runs bench/embed_gpu.py (DINOv2 ViT-B/14-reg4, 224x224, bf16, compiled: HDF5 in, Parquet out)
# and bench/train_gpu.py (seed-size reward transformer, B 256, bf16, compiled). Logs and JSON go
# to $OUT (default /tmp/rayrm-gpu); the benchmarks' summary lines to stdout. EXTRA=--tiny makes
# both small enough for a CPU rehearsal.
set -uo pipefail
OUT=${OUT:-/tmp/rayrm-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

if [ ! -d /tmp/raysite/ray ]; then
  mkdir -p /tmp/raysite
  tar -xJf .devcarry/ray-slim.tar.xz -C /tmp/raysite
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/raysite .devcarry/*.whl
fi
# Ray's workers inherit the head's environment: rayrm must be importable there too.
export PYTHONPATH=/tmp/raysite:$PWD
python3 -c "import ray, torch, rayrm.embed, rayrm.train.trainer; print('ray', ray.__version__, 'torch', torch.__version__)" || exit 1
python3 -m ray.scripts.scripts start --head --num-gpus=1 --include-dashboard=false \
  >"$OUT/ray-start.log" 2>&1 || { tail -20 "$OUT/ray-start.log"; exit 1; }
export RAY_ADDRESS=auto

summary() { grep -E "bench\.|Error|error:|Traceback" | grep -v "^\s*File " | tail -"$1"; }

# GPU utilisation once a second through both runs: what bounds the pipeline.
nvidia-smi dmon -s u -d 1 >"$OUT/dmon.log" 2>&1 &
echo "== embedding: DINOv2 ViT-B/14-reg4 224x224 bf16 compiled, HDF5 -> Parquet"
timeout "${EMBED_TIMEOUT:-280}" python3 bench/embed_gpu.py --size 224 224 --frames 8192 \
  --repeat "${EMBED_REPEAT:-32}" --compile --json "$OUT/embed.json" ${EXTRA:-} 2>&1 | tee "$OUT/embed.log" | summary 14

[ -n "${SKIP_TRAIN:-}" ] && { kill %1; python3 -m ray.scripts.scripts stop >/dev/null 2>&1; exit 0; }
echo "== training: seed-size reward transformer, B 256, bf16, compiled"
timeout "${TRAIN_TIMEOUT:-200}" python3 bench/train_gpu.py --steps "${TRAIN_STEPS:-3000}" \
  --json "$OUT/train.json" ${EXTRA:-} 2>&1 | tee "$OUT/train.log" | summary 8

kill %1 2>/dev/null
python3 -m ray.scripts.scripts stop >/dev/null 2>&1
