#!/usr/bin/env bash
# The CPU results committed under benchmarks/results/. Run from the repository root on an otherwise idle machine:
#   benchmarks/run_cpu.sh                 (ITERS=5 by default; PEAK_GFLOPS=... to give the CPU's fp32 FMA peak)
#
# 1. Inference, every variant: `bench --engines` puts ours (NCHW, channels_last) beside timm's built-in eager (both
#    layouts), the built-in under torch.compile with Inductor freezing, and onnxruntime and OpenVINO on our ONNX
#    export, and where the CPU has native bf16 ours, the compiled built-in and OpenVINO in bf16 too; same weights, one
#    interleaved run per model, correctness of each against eager fp32. Engines whose package is missing are reported
#    as such.
# 2. The pointwise half alone: our GEMM against oneDNN's 1x1 convolution (+ addcmul) and MKL's sgemm; the depthwise
#    half alone: our dw_block against oneDNN's bare depthwise conv and a copy; the stem alone: its fast path against
#    the plain modules; our paths (cpu, cpu_compiled, cpu_hybrid, eager) forced on whole models (fp32, and bf16
#    autocast where the CPU has native bf16).
# 3. Training with the memory-lean block forced, against the built-in (auto keeps whichever it measures faster).
set -euo pipefail
ITERS=${ITERS:-5}
R=${RESULTS_DIR:-benchmarks/results}  # RESULTS_DIR=... writes elsewhere (e.g. one folder per CPU)
PEAK=()
[ -n "${PEAK_GFLOPS:-}" ] && PEAK=(--peak-gflops "$PEAK_GFLOPS")
B() { timm-convmixer bench --device cpu --threads "$(nproc)" --iters "$ITERS" --warmup 1 --no-progress "$@"; }

IMAGENET="convmixer_768_32 convmixer_1024_20_ks9_p14 convmixer_1536_20 convmixer_1536_24_ks9_p14 convmixer_1024_16_ks9_p7 convmixer_512_16_ks8_p7"
CIFAR="convmixer_256_8_ks5_p2 convmixer_256_8_ks9_p1"

for m in $IMAGENET; do
  B --engines --models "$m" --batch-size 8 --img-size 224 "${PEAK[@]}" \
    --out "$R/cpu_engines_$m.json" --chart "$R/cpu_engines_$m.png"
done
for m in $CIFAR; do
  B --engines --models "$m" --batch-size 64 --img-size 32 "${PEAK[@]}" \
    --out "$R/cpu_engines_$m.json" --chart "$R/cpu_engines_$m.png"
done

python benchmarks/cpu_pointwise.py --rounds 7 --out $R/cpu_pointwise.json
python benchmarks/cpu_depthwise.py --rounds 9 --out $R/cpu_depthwise.json
python benchmarks/cpu_stem.py --rounds 9 --out $R/cpu_stem.json
# 2b. Our CPU paths against each other on whole models (what auto chooses between)
python benchmarks/cpu_paths.py --rounds 7 --out $R/cpu_paths.json
# ... and under bf16 autocast where the CPU has native bf16 (elsewhere oneDNN would emulate it)
if python -c 'import sys; from timm_convmixer.fast import cpu; sys.exit(not cpu.native_bf16())'; then
  python benchmarks/cpu_paths.py --bf16 --rounds 7 --out $R/cpu_paths_bf16.json
fi

# 3. Training: the memory-lean block against the built-in, in each implementation a CPU has, forced (--backend lean:
#    torch's kernels; lean_cpu: our compiled normalisations and both convolutions), and as auto chooses on first use (what a user
#    gets); 768_32 cut to 8 blocks to keep the run short
for impl in lean lean_cpu auto; do
  B --models convmixer_768_32 --model-kwargs depth=8 --batch-size 8 --img-size 224 --task train --dtype fp32 \
    --modes nchw channels_last --backend $impl --out $R/cpu_train_${impl}_768.json --chart $R/cpu_train_${impl}_768.png
  B --models convmixer_256_8_ks5_p2 --batch-size 64 --img-size 32 --task train --dtype fp32 \
    --modes nchw channels_last --backend $impl --out $R/cpu_train_${impl}_cifar.json \
    --chart $R/cpu_train_${impl}_cifar.png
  # activations past glibc's 32 MiB mmap threshold (64 x 256 x 32 x 32 fp32: 67 MB), where fresh pages cost
  B --models convmixer_256_8_ks9_p1 --batch-size 64 --img-size 32 --task train --dtype fp32 \
    --modes nchw channels_last --backend $impl --out $R/cpu_train_${impl}_cifar_p1.json \
    --chart $R/cpu_train_${impl}_cifar_p1.png
done
# ... and under bf16 autocast, lean_cpu forced (fp32 there, but for its pointwise GEMMs in bf16 pairs where the CPU
# has them natively) and as auto chooses (where the CPU lacks native bf16 the built-in's bf16 convolutions are
# emulated, 15-20x slower, and these runs take several minutes)
for impl in lean_cpu auto; do
  for case in "convmixer_256_8_ks5_p2 64 32 cifar" "convmixer_768_32 8 224 768"; do
    set -- $case
    B --models $1 --batch-size $2 --img-size $3 --task train --dtype bf16 \
      $([ $4 = 768 ] && echo --model-kwargs depth=8) --modes nchw channels_last --backend $impl \
      --out $R/cpu_train_${impl}_bf16_$4.json --chart $R/cpu_train_${impl}_bf16_$4.png
  done
done
