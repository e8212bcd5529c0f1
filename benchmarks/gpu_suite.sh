#!/usr/bin/env bash
# Every GPU check and benchmark of docs/benchmarks.md in one go, for a borrowed GPU machine
# with little time on it.  Each step has its own time limit and writes its output to
# $OUT/<step>.txt as it goes, so a step that runs out of time costs only itself.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_suite.sh          # the package importable (PYTHONPATH)
#   OUT=/tmp/gpu bash benchmarks/gpu_suite.sh kfac eigh  # only these steps
#
# Steps: CUDA tests; K-FAC collection vs fwd+bwd; eigh of all ResNet-50 factors; the VGG19
# prune step on 100 batches; pruned-model latency (ResNet-50, ViT-S); peak memory;
# curvlinops/BackPACK speed.
set -u
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
ED="python3 -m eigendamage"
SELECTED=" ${*:-tests kfac eigh prune_step latency memory libs} "

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  [[ $SELECTED == *" $name "* ]] || return 0
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.txt"
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

step tests 150 python3 -m pytest -q -x tests/test_cuda.py
step kfac 100 $ED bench kfac -w vgg19-cifar -w resnet18-32px -w resnet50-224 -w vit-s \
  --batches 3 --repeats 3 --device cuda
step eigh 80 $ED bench eigh -w resnet50-224 --conv-mode channel --batches 1 --repeats 3 \
  --device cuda
step prune_step 60 $ED bench prune-step -w vgg19-cifar --batches 100 --batch-size 128 \
  --device cuda
step latency 120 python3 benchmarks/latency.py --device cuda --batch-sizes 1 8 64 \
  --repeats 20 --rounds 3 --warmup 5 --runs "$OUT/runs" --out "$OUT/latency.md"
step memory 60 python3 -c "from eigendamage.benchmarking.memory import bench_memory
from eigendamage.benchmarking.workloads import markdown
print(markdown(bench_memory(['vgg19-cifar', 'resnet18-32px', 'resnet50-224'], device='cuda')))"
step libs 60 python3 benchmarks/compare_libs.py --batches 2 --repeats 3 --device cuda
rm -rf "$OUT/runs"
