#!/usr/bin/env bash
# Set up .venv (if needed), train a small diffusion model on the CIFAR-10 cars on the CPU, and
# sample 64 images from it. Data: $DIFFLAB_DATA, else the development copy at
# ../shared/data/cifar10-jpg/train if it exists, else CIFAR-10 downloaded by torchvision.
#
# The budget is a number of images, not minutes: every machine trains the same model (the one
# whose FID the README quotes); a slower machine takes longer and its progress bar says how long.
# 48,825 images took 5.7 minutes on the 2-core machine that measured it (fp32 matmul peak 215-221
# GFLOP/s) and take about 11.5 on the quality benchmark's (186 GFLOP/s).
EXTRAS=metrics source "$(dirname "$0")/venv.sh"
DATA=${DIFFLAB_DATA:-}
if [ -z "$DATA" ]; then
  if [ -d ../shared/data/cifar10-jpg/train ]; then DATA=../shared/data/cifar10-jpg/train; else DATA=cifar10; fi
fi
IMAGES=${IMAGES:-48825}
RUN=${RUN:-runs/quickstart}
if [ -f "$RUN/config.json" ]; then
  "$VENV/bin/difflab" train --resume "$RUN"  # finish an interrupted run (a no-op when done)
else
  "$VENV/bin/difflab" train --preset flow-cpu --data "$DATA" --class automobile --out "$RUN" --images "$IMAGES"
fi
"$VENV/bin/difflab" sample "$RUN" --num 64 --out "$RUN/samples" --strip --gif
echo "samples: $RUN/samples/grid.png, progress: $RUN/samples/strip.png, training pictures: $RUN/pictures/"
