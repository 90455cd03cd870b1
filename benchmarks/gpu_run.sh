#!/usr/bin/env bash
# The GPU benchmark in one command (docs/how-to/speed.md, "On a GPU"): about 4 minutes on one GPU.
#
#   pip install -e ".[benchmarks]" torchvision     # once; FrEIA (benchmarks extra) is optional
#   bash benchmarks/gpu_run.sh [OUT_DIR]           # default OUT_DIR: benchmarks/results
#
# Writes OUT_DIR/gpu.json (rewritten after every section) and OUT_DIR/gpu.log; see the
# docstring of benchmarks/gpu.py for the sections. Stops at once without a CUDA GPU.
# On a machine without network, put the wheels of pytorch-metric-learning, normflows and FrEIA
# (`pip wheel --no-deps -w .whl ...` elsewhere) in .whl/ next to this repository's setup.cfg:
# they are installed into a temporary folder first.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else
  'benchmarks/gpu_run.sh needs a CUDA GPU: torch ' + torch.__version__ + ' sees none (torch.cuda.is_available() is False).')"
if compgen -G ".whl/*.whl" > /dev/null; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true; } 2>&1 | tee "$out/gpu.log"
python3 benchmarks/gpu.py --out "$out/gpu.json" 2>&1 | tee -a "$out/gpu.log"
