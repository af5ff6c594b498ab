#!/usr/bin/env bash
# The executors' GPU measurements, prepared for one NVIDIA H100 (about 8 minutes); run from the
# repository root on a machine whose Python environment has gradsparse and a CUDA build of jax
# (nothing is downloaded here). Writes into ${OUT:-runs/gpu}:
#   bench.md                 the training-step benchmark rows (fused steps, seed groups)
#   quick/report.json        the quick preset with the local executor (one worker per GPU)
#   runtimes_full.json       the full preset's per-job seconds and its projection on k workers
# Not run by the tests or CI: the docs (docs/executors.md) say whether it has been run.
set -euo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
python -c "import jax; d = jax.devices()[0]; assert d.platform == 'gpu', d; print('device', d)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
t0=$(date +%s)
timeout 90 gradsparse bench --only fused,seeds --quick --out "$OUT/bench.md" || echo "bench: stopped after 90 s"
timeout 240 gradsparse check --preset quick --executor local --out "$OUT/quick" --overwrite --quiet \
  || echo "quick preset: stopped after 240 s (report.json lists what finished)"
timeout 150 python benchmarks/preset_runtimes.py --preset full --short 100 --long 1000 --families 12 --out "$OUT" \
  || echo "full preset runtimes: stopped after 150 s"
echo "wall $(( $(date +%s) - t0 )) s; load $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$OUT/wall.txt"
