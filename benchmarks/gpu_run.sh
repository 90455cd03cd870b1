#!/usr/bin/env bash
# The short GPU benchmark (docs/benchmarks.md, "On a GPU"), for a session lent a device machine.
#
# Here, once (the device image has torch but not these pure-Python packages, and no network):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip wheel --no-deps -w .whl pytorch-metric-learning==2.9.0 normflows==1.7.3 FrEIA==0.2
# There, one `run` with carry [".whl"] and timeout_s about 540:
#   bash benchmarks/gpu_run.sh
# It writes speed_cuda.json and speed_cuda.log under $OUT (else benchmarks/results/).
# SECTIONS overrides the speed.py sections (default: cuda,compiled).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/nir_site .whl/*.whl
  export PYTHONPATH=/tmp/nir_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/speed_cuda.log" || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$out/speed_cuda.log"
python3 benchmarks/speed.py --sections "${SECTIONS:-cuda,compiled}" --out "$out/speed_cuda.json" 2>&1 | tee -a "$out/speed_cuda.log"
