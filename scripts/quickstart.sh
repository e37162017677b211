#!/usr/bin/env bash
# Set up .venv (if needed), train a small diffusion model on the CIFAR-10 cars for a few minutes
# on the CPU, and sample 64 images from it. Data: $DIFFLAB_DATA, else the development copy at
# ../shared/data/cifar10-jpg/train if it exists, else CIFAR-10 downloaded by torchvision.
EXTRAS=metrics source "$(dirname "$0")/venv.sh"
DATA=${DIFFLAB_DATA:-}
if [ -z "$DATA" ]; then
  if [ -d ../shared/data/cifar10-jpg/train ]; then DATA=../shared/data/cifar10-jpg/train; else DATA=cifar10; fi
fi
MINUTES=${MINUTES:-10}
RUN=${RUN:-runs/quickstart}
if [ -f "$RUN/config.json" ]; then
  "$VENV/bin/difflab" train --resume "$RUN" --time-limit "$MINUTES"
else
  "$VENV/bin/difflab" train --preset flow-cpu --data "$DATA" --class automobile --out "$RUN" --time-limit "$MINUTES"
fi
"$VENV/bin/difflab" sample "$RUN" --num 64 --out "$RUN/samples" --strip --gif
echo "samples: $RUN/samples/grid.png, progress: $RUN/samples/strip.png, training pictures: $RUN/pictures/"
