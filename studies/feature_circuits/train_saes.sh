#!/usr/bin/env bash
# The dictionaries of the study: one TopK SAE (2,048 latents, k = 16, batches of 1,024 tokens: ~195 steps)
# per hook_z of Gemma 3 270M's 18 layers (4 heads x 256 concatenated: d_in 1,024) and on the residual
# stream after layers 5, 9 and 13, from one cache pass of 200k tokens of the offline corpus; seeds 0-4
# train on the same cache (the head tables need >= 5 seeds).
# Usage: bash studies/feature_circuits/train_saes.sh [SEED ...]   (default 0 1 2 3 4)
set -euo pipefail
hookpoints=""
for layer in $(seq 0 17); do hookpoints+="\"blocks.$layer.attn.hook_z\","; done
hookpoints+='"blocks.5.hook_resid_post","blocks.9.hook_resid_post","blocks.13.hook_resid_post"'
for seed in "${@:-0 1 2 3 4}"; do
  for s in $seed; do
    python train.py \
      --set "cache.hookpoints=[$hookpoints]" --set 'sae.hookpoints="all"' \
      --set cache.tokens=200000 --set cache.dir=out/cache/feature_circuits \
      --set sae.d_sae=2048 --set sae.k=16 --set train.batch_size=1024 --set eval.enabled=false \
      --set train.seed="$s" --set train.out_dir="out/fc/seed$s"
  done
done
