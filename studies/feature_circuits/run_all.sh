#!/usr/bin/env bash
# Regenerates every table of studies/feature_circuits/README.md from the SAEs of train_saes.sh (run that
# first): the IOI feature circuit over all 21 spliced sites (seed 0), then the head tables of IOI and
# docstring over seeds 0-4.
set -euo pipefail
saes=$(ls -d out/fc/seed0/*/*_2048 | sort -V)
sae-analyze feature-circuit --task ioi --model gemma-3-270m --saes $saes \
  --out studies/feature_circuits/results/ioi --prompts 40 --method relp \
  --compare attribution_patching --check-per-site 6
python studies/feature_circuits/study.py heads --task ioi --seeds 0 1 2 3 4
python studies/feature_circuits/study.py heads --task docstring --seeds 0 1 2 3 4
