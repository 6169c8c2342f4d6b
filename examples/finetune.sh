#!/usr/bin/env bash
# Fine-tune ImageNet-1k ConvMixer weights (timm's Hub .in1k) on your own ImageFolder dataset with a new head.
#
#   examples/finetune.sh /path/to/pytorch-image-models/train.py /path/to/dataset NUM_CLASSES [MODEL] [extra flags]
#
# The dataset is DATA/train/<class>/* and DATA/val/<class>/*. --pretrained loads the Hub weights (download on first
# use); --num-classes replaces the 1000-way head with a freshly initialised one (timm drops the old classifier when
# the class count differs). --layer-decay 0.75 gives every block its own LR, the head the full LR and each block
# below it 0.75x the one above (the model's group_matcher: stem, then one group per block), so the pretrained
# early layers move least.
set -euo pipefail
TRAIN_PY=${1:?usage: $0 /path/to/train.py /path/to/dataset NUM_CLASSES [MODEL] [extra flags]}
DATA=${2:?usage: $0 /path/to/train.py /path/to/dataset NUM_CLASSES [MODEL] [extra flags]}
NUM_CLASSES=${3:?usage: $0 /path/to/train.py /path/to/dataset NUM_CLASSES [MODEL] [extra flags]}
MODEL=${4:-convmixer_768_32.in1k}

python "$TRAIN_PY" \
  --data-dir "$DATA" --train-split train --val-split val \
  --model "$MODEL" --pretrained --num-classes "$NUM_CLASSES" \
  -b 64 -j 8 --epochs 30 \
  --opt adamw --lr 1e-3 --weight-decay 0.05 --layer-decay 0.75 --clip-grad 1.0 \
  --sched cosine --warmup-epochs 3 --warmup-lr 1e-6 \
  --amp --model-ema --model-ema-decay 0.999 \
  --aa rand-m9-mstd0.5 --mixup 0.2 --cutmix 0 --reprob 0.25 --drop-path 0.1 \
  "${@:5}"
