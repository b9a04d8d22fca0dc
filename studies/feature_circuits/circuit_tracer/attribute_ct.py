"""circuit-tracer's attribution graph of one prompt over the toolkit's transcoders; runs in circuit-tracer's
own venv (README.md), offline. Writes out/ct/graph.pt for compare.py.

    /work/peers/circuit_tracer/bin/python studies/feature_circuits/circuit_tracer/attribute_ct.py [PROMPT]
"""

import glob
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch
from circuit_tracer import ReplacementModel, attribute
from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet
from circuit_tracer.utils import tl_nnsight_mapping
from safetensors.torch import load_file

MODEL = glob.glob(str(Path.home() / ".cache/sae-toolkit/models/gemma-3-270m*"))[0]  # sae.lm's conversion
TRANSCODER = "out/ct/tc/L{}/final/sae.safetensors"
LAYERS, D_MODEL, D_TC, K = 18, 640, 2048, 16

# Our transcoders predict the output of HF's layers.N.mlp (before post_feedforward_layernorm), a site
# circuit-tracer's Gemma 3 mapping lacks: add it here, for this process only.
gemma3 = tl_nnsight_mapping._REGISTRY["Gemma3ForCausalLM"]
tl_nnsight_mapping._REGISTRY["Gemma3ForCausalLM"] = replace(
    gemma3,
    feature_hook_mapping={
        **gemma3.feature_hook_mapping,
        "mlp.hook_out": ("model.layers[{layer}].mlp", "output"),
    },
)


class ReluTopK(torch.nn.Module):
    """The toolkit's TopK activation, relu(topk(pre)), which no circuit-tracer file loader builds."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, pre: torch.Tensor) -> torch.Tensor:
        values, indices = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def main() -> None:
    torch.set_num_threads(1)
    transcoders = {}
    for layer in range(LAYERS):
        weights = load_file(TRANSCODER.format(layer))
        tc = SingleLayerTranscoder(
            D_MODEL, D_TC, ReluTopK(K), layer, device=torch.device("cpu"), dtype=torch.float32
        )
        tc.load_state_dict({name: weights[name].float() for name in ("W_enc", "W_dec", "b_enc", "b_dec")})
        transcoders[layer] = tc
    tc_set = TranscoderSet(
        transcoders, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out", scan="sae-toolkit"
    )
    model = ReplacementModel.from_pretrained_and_transcoders(
        MODEL, tc_set, backend="nnsight", device=torch.device("cpu"), dtype=torch.float32
    )
    prompt = sys.argv[1] if len(sys.argv) > 1 else "The capital of France is"
    ids = model.tokenizer(prompt, return_tensors="pt").input_ids[0]
    started = time.perf_counter()
    graph = attribute(ids, model, max_n_logits=1, batch_size=64, verbose=False)
    print(f"attributed in {time.perf_counter() - started:.1f} s: targets {graph.logit_targets}", flush=True)
    saved = {
        "ids": ids,
        "active_features": graph.active_features,
        "selected_features": graph.selected_features,
        "adjacency": graph.adjacency_matrix,
        "logit_targets": [str(t) for t in graph.logit_targets],
        "n_layers": LAYERS,
    }
    torch.save(saved, "out/ct/graph.pt")


if __name__ == "__main__":
    main()
