"""The 18 TopK transcoders of the circuit-tracer comparison, one per layer of Gemma 3 270M: each reads
`blocks.L.mlp.hook_in` and predicts `blocks.L.mlp.hook_out` (2,048 latents, k 16, no skip), trained on the
cache of cache.toml (32,768 tokens, one pass). Writes out/ct/tc/L{layer}/final.

    python studies/feature_circuits/circuit_tracer/train_transcoders.py
"""

import time

import sae
from cache import PairedReader

CACHE, OUT, LAYERS = "out/ct/cache", "out/ct/tc", 18

for layer in range(LAYERS):
    started = time.perf_counter()
    site_in, site_out = f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.mlp.hook_out"
    reader = PairedReader(CACHE, site_in, site_out, batch_size=1024, seed=0)
    cfg = sae.SAEConfig(
        architecture="topk",
        d_in=640,
        d_sae=2048,
        k=16,
        transcoder=True,
        d_out=640,
        model_name="gemma-3-270m",
        hookpoint=site_in,
        output_hookpoint=site_out,
    )
    train = sae.TrainConfig(total_tokens=65_536, batch_size=1024, out_dir=f"{OUT}/L{layer}", log_every=1000)
    sae.train(reader, train, cfg).save(f"{OUT}/L{layer}/final")  # the reader ends after the cache's 32,768
    print(f"layer {layer}: {time.perf_counter() - started:.1f} s", flush=True)
