#!/usr/bin/env bash
# On a lent GPU machine (bare image with its own jax/flax, no internet), from the repo root,
# with .device/ (python -m experiments.gpu_tables pack) and .whl/ (the pure-Python wheels
# the image lacks or has at other versions: ml_collections, flax, optax, chex) carried:
#
#   bash experiments/gpu_tables_device.sh "$OUT" 440 [docs/device/<earlier run>,...] [FLAG...]
#
# $1: where the results go (driver.log, tables.tar.gz: snapshots while it runs);
# $2: the driver's deadline in seconds (leave ~40 s below the call's own limit);
# $3 (optional, may be ""): comma-separated result directories of earlier runs in the
#     checkout, whose evaluated rows are not computed again (gpu_tables run --seed);
# the rest: further flags of `gpu_tables run` (--variant gpu, --job TABLE:ROW,...); the
#     work directory is runs/<variant> (runs/gpu10k by default).
set -euo pipefail
out=${1:?usage: gpu_tables_device.sh OUT DEADLINE_S}
deadline=${2:?usage: gpu_tables_device.sh OUT DEADLINE_S}
mkdir -p "$out"
# Everything it installs or caches stays in the checkout, under runs/device (ignored).
dev=$PWD/runs/device
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$dev/site" .whl/*.whl
export PYTHONPATH=$dev/site:$PWD PYTHONUNBUFFERED=1
export IEC_JAX_CACHE=$dev/iec_cache JAX_COMPILATION_CACHE_DIR=$dev/jax_cache
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, jax, flax, numpy; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'numpy', numpy.__version__, jax.devices())"
} 2>&1 | tee "$out/machine.txt"
# No pipe after the driver: its log goes to $out/driver.log line by line.
python3 -m experiments.gpu_tables run --bundle .device --out "$out" \
    --deadline_s "$deadline" --row_margin_s 120 --assembly_s 60 ${3:+--seed "$3"} "${@:4}"
