# The shipped model's recipe, sourced by training/reproduce.sh and
# training/tools/leave_source_out.sh so that both train exactly the same way (see models/README.md).
# All options not given keep the defaults of `python -m training train --help`.
SIZE=192             # input side: ~3.5x faster than the 256 px ResNet-18 on 2 CPU cores (card)
SEED=2015            # the project's seed: patient split, weights, sampling, augmentation
SPLIT=60,20,20       # patients train,val,test: >= 2 liver and 3 pelvis patients held out
VERSION=anatomy-convnet-2026.11.1
SHIPPED_TRAIN_ARGS=(--seed "$SEED" --width 32 --blocks 1,1,1,1 --epochs 40 --patience 15 --threads 2
    --pair-p 0.5 --pair-classes legs,pelvis)
