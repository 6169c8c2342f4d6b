#!/usr/bin/env bash
# The CPU results committed under benchmarks/results/ (ours vs timm's built-in ConvMixer, same weights, interleaved,
# medians, ratio measured in the same run). Run from the repository root on an otherwise idle machine:
#   benchmarks/run_cpu.sh          (ITERS=7 by default)
set -euo pipefail
ITERS=${ITERS:-7}
R=benchmarks/results
B() { timm-convmixer bench --device cpu --threads "$(nproc)" --iters "$ITERS" --warmup 1 --no-progress "$@"; }

IMAGENET="convmixer_768_32 convmixer_1024_20_ks9_p14 convmixer_1536_20 convmixer_1536_24_ks9_p14 convmixer_1024_16_ks9_p7 convmixer_512_16_ks8_p7"
CIFAR="convmixer_256_8_ks5_p2 convmixer_256_8_ks9_p1"

# inference, fp32, every variant, eager NCHW and channels_last; one process per model (on this shared 2-core VM,
# absolute speeds drift by up to 2x between runs, so only the interleaved ratios within one run are compared)
for m in $IMAGENET; do
  B --models "$m" --batch-size 8 --img-size 224 --task infer --dtype fp32 --modes nchw channels_last \
    --out "$R/cpu_infer_$m.json" --chart "$R/cpu_infer_$m.png"
done
B --models $CIFAR --batch-size 64 --img-size 32 --task infer --dtype fp32 --modes nchw channels_last \
  --out $R/cpu_infer_cifar.json --chart $R/cpu_infer_cifar.png
# torch.compile (Inductor's CPU backend); ours hands the plain modules to the compiler
B --models convmixer_768_32 convmixer_1024_20_ks9_p14 --batch-size 8 --img-size 224 --task infer --dtype fp32 \
  --modes compile --out $R/cpu_infer_compile.json --chart $R/cpu_infer_compile.png
# bf16 autocast inference (both compute in bf16; ours through oneDNN bf16 convolutions)
B --models convmixer_768_32 convmixer_1024_20_ks9_p14 --batch-size 8 --img-size 224 --task infer --dtype bf16 --modes nchw channels_last \
  --out $R/cpu_infer_bf16.json --chart $R/cpu_infer_bf16.png
# training step (forward + backward), throughput and peak memory
B --models convmixer_768_32 convmixer_1024_20_ks9_p14 --batch-size 8 --img-size 224 --task train --dtype fp32 \
  --modes nchw channels_last --out $R/cpu_train_imagenet.json --chart $R/cpu_train_imagenet.png
B --models convmixer_256_8_ks5_p2 --batch-size 64 --img-size 32 --task train --dtype fp32 --modes nchw channels_last \
  --out $R/cpu_train_cifar.json --chart $R/cpu_train_cifar.png
# the memory-lean training block, forced (--backend lean), against the built-in: its throughput cost on this CPU
# (auto keeps whichever of lean and the plain modules it measures faster; see README "Speed")
B --models convmixer_768_32 --model-kwargs depth=8 --batch-size 8 --img-size 224 --task train --dtype fp32 \
  --modes nchw channels_last --backend lean --out $R/cpu_train_lean_768.json --chart $R/cpu_train_lean_768.png
B --models convmixer_256_8_ks5_p2 --batch-size 64 --img-size 32 --task train --dtype fp32 --modes nchw channels_last \
  --backend lean --out $R/cpu_train_lean_cifar.json --chart $R/cpu_train_lean_cifar.png
