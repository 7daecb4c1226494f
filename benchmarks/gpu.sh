#!/usr/bin/env bash
# The GPU check of issue 15, as one script that fits a short device lease (under 8 minutes on one GPU):
#   1. the knconv table (KNConv2d vs unfold vs Conv2d+BatchNorm2d at batch 32; target KN/convBN <= 1.3 on CUDA),
#   2. train_local throughput per norm at batch 8, 16 and 32,
#   3. a 3-round fedkn simulation on the embedded digits with four clients per GPU (client-num-gpus=0.25).
# Run it from the repository root with the venv's python first on PATH:
#   . .venv/bin/activate && bash benchmarks/gpu.sh            # on the GPU machine
#   bash benchmarks/gpu.sh --quick                             # smoke run on a CPU (tiny settings, no GPU resources)
# Every part is bounded by `timeout`, so one part that hangs cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
quick=0
[ "${1:-}" = "--quick" ] && quick=1
py=${PYTHON:-python}
dataset=fmnist
[ -d /usr/share/datasets/fashion-mnist ] || dataset=digits
export RAY_USAGE_STATS_ENABLED=0
"$py" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
rc=0
if [ "$quick" = 1 ]; then
  echo "== knconv (--quick)"
  timeout 300 "$py" benchmarks/knconv.py --quick || rc=1
  echo "== throughput (--quick, digits)"
  timeout 300 "$py" benchmarks/throughput.py --quick --dataset digits --norms kn,bn --batches 8,16 || rc=1
  echo "== simulation (--quick: 2 rounds, 2 clients, client-num-gpus=0 on a CPU)"
  timeout 300 "$py" -m fedkn run --config configs/smoke.toml --set num-rounds=2 --set num-clients=2 \
    --set local-steps=5 --set output-dir="${TMPDIR:-/tmp}/fedkn-gpu-quick" || rc=1
else
  echo "== knconv (batch 32)"
  timeout 240 "$py" benchmarks/knconv.py --repeats 10 || rc=1
  echo "== throughput ($dataset, batch 8/16/32)"
  timeout 150 "$py" benchmarks/throughput.py --dataset "$dataset" --batches 8,16,32 --threads 0 || rc=1
  echo "== simulation (3 rounds, client-num-gpus=0.25)"
  timeout 90 "$py" -m fedkn run --set num-rounds=3 --set client-num-gpus=0.25 --set client-num-cpus=2 \
    --set output-dir="${TMPDIR:-/tmp}/fedkn-gpu" || rc=1
fi
exit "$rc"
