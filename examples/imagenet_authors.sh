#!/usr/bin/env bash
# The ConvMixer authors' ImageNet-1k recipe (github.com/locuslab/convmixer README) on an unchanged timm train.py.
#
#   examples/imagenet_authors.sh /path/to/pytorch-image-models/train.py /path/to/imagenet [GPUS] [MODEL]
#
# They trained on 10 GPUs x batch 64 (global batch 640): with another GPU count keep the global batch (raise -b) or
# scale --lr with it. convmixer_1536_20: 150 epochs (81.37% top-1); convmixer_768_32: 300 epochs (80.16%), set
# EPOCHS=300. Their "onecycle" schedule is not one of timm's, so train.py runs through examples/train_onecycle.py,
# which registers it in timm's scheduler factory; it is stepped per update (--sched-on-updates) as theirs was.
#
# RandAugment: their policy was rand-m9-mstd0.5-inc1. With Pillow >= 10 timm's increasing Posterize at magnitude 10
# (reachable through mstd noise) asks Pillow for 0 bits and the loader worker crashes ("bits must be between or
# equal to 1 and 8"); mmax9 caps the noisy magnitude at 9 (1 bit kept), the nearest policy that runs.
set -euo pipefail
TRAIN_PY=${1:?usage: $0 /path/to/train.py /path/to/imagenet [GPUS] [MODEL]}
DATA=${2:?usage: $0 /path/to/train.py /path/to/imagenet [GPUS] [MODEL]}
GPUS=${3:-10}
MODEL=${4:-convmixer_1536_20}
EPOCHS=${EPOCHS:-150}
HERE=$(cd "$(dirname "$0")" && pwd)

torchrun --nproc_per_node="$GPUS" "$HERE/train_onecycle.py" "$TRAIN_PY" \
  --data-dir "$DATA" --train-split train --val-split val \
  --model "$MODEL" --num-classes 1000 --input-size 3 224 224 \
  -b 64 -j 10 --epochs "$EPOCHS" \
  --opt adamw --lr 0.01 --opt-eps 1e-3 --clip-grad 1.0 \
  --sched onecycle --sched-on-updates --warmup-epochs 0 \
  --amp \
  --aa rand-m9-mstd0.5-inc1-mmax9 --cutmix 0.5 --mixup 0.5 --reprob 0.25 --remode pixel \
  "${@:5}"
