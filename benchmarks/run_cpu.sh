#!/usr/bin/env bash
# CPU results committed under benchmarks/results/: ours vs timm's built-in ConvMixer, batch 8, 224px, fp32,
# inference, NCHW and channels_last, 2 threads. Run from the repository root.
set -euo pipefail
ITERS=${ITERS:-5}
for model in convmixer_768_32 convmixer_1024_20_ks9_p14 convmixer_1536_20; do
  timm-convmixer bench --models "$model" --batch-size 8 --img-size 224 --dtype fp32 \
    --modes nchw channels_last --task infer --threads 2 --iters "$ITERS" --warmup 1 --device cpu \
    --out "benchmarks/results/cpu_${model}.json" --chart "benchmarks/results/cpu_${model}.png" --no-progress
done
