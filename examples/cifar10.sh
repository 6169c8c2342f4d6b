#!/usr/bin/env bash
# locuslab/convmixer-cifar10 (ConvMixer-256/8, kernel 5, patch 2: 92.6% after 25 epochs) as timm train.py flags.
#
#   examples/cifar10.sh /path/to/pytorch-image-models/train.py /path/to/cifar-data-dir [extra train.py flags]
#
# Their script -> train.py:
#   batch 512, 25 epochs, AdamW lr-max 0.05, wd 0.005     -> -b 512 --epochs 25 --opt adamw --lr 0.05 --weight-decay 0.005
#   piecewise-linear LR per iteration (0 -> max at 2/5 -> max/20 at 4/5 -> 0)
#                                                          -> --sched onecycle --sched-on-updates (examples/train_onecycle.py)
#   clip_grad_norm_ 1.0, AMP                               -> --clip-grad 1.0 --amp
#   RandomResizedCrop(32, scale=(1.0, 1.0), ratio=(1, 1))  -> --scale 1.0 1.0 --ratio 1.0 1.0
#   RandomHorizontalFlip, no jitter, no erasing, no mixup  -> --hflip 0.5 --color-jitter 0 --reprob 0 --mixup 0 --cutmix 0
#   plain cross-entropy                                    -> --smoothing 0
#   torchvision RandAugment(num_ops=2, magnitude=12) of 31 bins (12/30 of the maximum strength)
#                                                          -> --aa rand-n2-m4 (timm's magnitude is out of 10; timm's
#                                                             op set differs slightly from torchvision's)
#   CIFAR-10 mean/std normalisation, 32px, no resize       -> from the model's default cfg (crop_pct 1.0, bilinear)
# The dataset is torchvision's CIFAR-10 through timm's create_dataset (torch/cifar10); --dataset-download fetches it.
set -euo pipefail
TRAIN_PY=${1:?usage: $0 /path/to/train.py /path/to/data-dir [extra flags]}
DATA=${2:?usage: $0 /path/to/train.py /path/to/data-dir [extra flags]}
HERE=$(cd "$(dirname "$0")" && pwd)

python "$HERE/train_onecycle.py" "$TRAIN_PY" \
  --dataset torch/cifar10 --dataset-download --data-dir "$DATA" --train-split train --val-split test \
  --model convmixer_256_8_ks5_p2 --num-classes 10 --img-size 32 \
  -b 512 -j 4 --epochs 25 \
  --opt adamw --lr 0.05 --weight-decay 0.005 --clip-grad 1.0 \
  --sched onecycle --sched-on-updates --warmup-epochs 0 \
  --amp \
  --aa rand-n2-m4 --scale 1.0 1.0 --ratio 1.0 1.0 --hflip 0.5 --color-jitter 0 --train-interpolation bilinear \
  --reprob 0 --mixup 0 --cutmix 0 --smoothing 0 \
  "${@:3}"
