"""The toolkit's attribution values on circuit-tracer's graph (out/ct/graph.pt, from attribute_ct.py): the
same prompt, the same transcoders spliced with `SplicedModel.run_connected` (each site's direct effect, the
others held), activation x gradient against a zero baseline. Writes results/compare.json.

    python studies/feature_circuits/circuit_tracer/compare.py
"""

import json
from pathlib import Path

import torch

import sae
from sae.analysis.circuits.lrp import detached, quiet_norm_edits
from sae.analysis.circuits.splice import SplicedModel
from sae.lm import load_model

HERE = Path(__file__).resolve().parent
LAYERS = 18


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    ours, theirs = ours.double(), theirs.double()
    pearson = torch.corrcoef(torch.stack([ours, theirs]))[0, 1].item()
    return {"pearson": round(pearson, 4), "rel_l2": round(((ours - theirs).norm() / theirs.norm()).item(), 4)}


def top(values_ct: torch.Tensor, values_ours: torch.Tensor, nodes: torch.Tensor, n: int = 10) -> list[dict]:
    return [
        {
            "node": nodes[i].tolist(),
            "circuit_tracer": round(values_ct[i].item(), 5),
            "ours": round(values_ours[i].item(), 5),
        }
        for i in values_ct.abs().topk(n).indices.tolist()
    ]


def compare(spliced: SplicedModel, graph: dict, extra_hooks: list) -> dict:
    """Our values for circuit-tracer's graph, the forward run with `extra_hooks`."""
    ids, adjacency = graph["ids"], graph["adjacency"]
    nodes = graph["active_features"][graph["selected_features"]]  # [n, 3]: (layer, position, feature)
    n = len(nodes)
    hooks = [f"blocks.{layer}.mlp.hook_in" for layer in range(LAYERS)]
    with quiet_norm_edits():
        logits, leaves, computed = spliced.run_connected(
            ids[None], last_position=True, extra_hooks=extra_hooks
        )
    last = logits[0, -1].float()
    target = int(last.argmax())
    metric = last[target] - last.mean()  # circuit-tracer's demeaned logit
    latents = [leaves[h].latents for h in hooks]
    grads = torch.autograd.grad(metric, latents, retain_graph=True)
    to_logit = torch.stack(
        [latents[li][0, p, f].detach() * grads[li][0, p, f] for li, p, f in nodes.tolist()]
    )
    out = {"prompt_ids": ids.tolist(), "target_token": target, "n_features": n}
    out["feature_to_logit"] = agreement(to_logit, adjacency[-1, :n])
    out["feature_to_logit_top10"] = top(adjacency[-1, :n], to_logit, nodes)

    # feature -> feature: into the late feature (layer >= 12) with the largest |effect on the logit|
    order = adjacency[-1, :n].abs().argsort(descending=True).tolist()
    into = next(i for i in order if nodes[i, 0] >= 12)
    layer, position, feature = nodes[into].tolist()
    upstream = torch.autograd.grad(
        computed[hooks[layer]].latents[0, position, feature], latents[:layer], retain_graph=True
    )
    to_feature, below = torch.zeros(n), nodes[:, 0] < layer
    for i in below.nonzero()[:, 0].tolist():
        li, p, f = nodes[i].tolist()
        to_feature[i] = latents[li][0, p, f].detach() * upstream[li][0, p, f]
    out["into_feature"] = {
        "node": [layer, position, feature],
        **agreement(to_feature[below], adjacency[into, :n][below]),
    }
    out["into_feature_top10"] = top(adjacency[into, :n], to_feature, nodes)

    # error nodes -> logit; circuit-tracer orders them layer-major, then position; BOS left out
    positions = len(ids)
    errors_ct = adjacency[-1, n : n + LAYERS * positions].view(LAYERS, positions)
    errors = [leaves[h].error for h in hooks]
    error_grads = torch.autograd.grad(metric, errors, retain_graph=True)
    errors_ours = torch.stack([(e[0].detach() * g[0]).sum(-1) for e, g in zip(errors, error_grads)])
    out["error_to_logit_non_bos"] = agreement(errors_ours[:, 1:].flatten(), errors_ct[:, 1:].flatten())
    return out


def main() -> None:
    torch.set_num_threads(1)
    graph = torch.load("out/ct/graph.pt")
    model = load_model("gemma-3-270m", dtype="float32")
    spliced = SplicedModel(model, [sae.load(f"out/ct/tc/L{layer}/final") for layer in range(LAYERS)])
    frozen = [(name, detached) for name in model.hook_dict if name.endswith(("hook_scale", "hook_pattern"))]
    out = {
        "gradients_through_everything": compare(spliced, graph, []),
        "norm_scales_and_attention_patterns_frozen": compare(spliced, graph, frozen),
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "compare.json").write_text(json.dumps(out, indent=1) + "\n")
    for name, figures in out.items():
        print(name, json.dumps({k: v for k, v in figures.items() if k.endswith(("logit", "feature", "bos"))}))


if __name__ == "__main__":
    main()
