"""A feature-circuit report (`sae-analyze feature-circuit` runs `write_feature_circuit`).

Splices the given SAEs into the model, estimates every node's effect on the task, and writes to OUT:
report.json (the nodes, edges, head estimates at hook_z sites, faithfulness/completeness curves with their
random-node and raw-basis controls, the patching check, each node's top prompts and explanation, the cost
of every step), curves.png and graph.html (the interactive graph: `graph_html.py`).
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import torch

from sae.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from sae.model import SparseAutoencoder
from sae.sites import output_hookpoint

from .feature_attribution import NodeEffects, node_effects, patching_check, site_values
from .feature_circuit import ERROR, Node, curves, ranked_nodes, raw_basis
from .feature_edges import feature_edges
from .graph_html import graph_html
from .splice import SiteNodes, SplicedModel
from .tasks import Task, build_task, task_metric, task_solved


def check_saes_match(saes, model_name: str) -> None:
    """Name an SAE trained on another model before any forward pass (width and hookpoint are checked by
    `SplicedModel`). Names compare as the model paths they resolve to."""
    from sae.lm import resolve_model_path

    wanted = resolve_model_path(model_name)
    for sae in saes:
        name = sae.cfg.model_name
        if name is not None and resolve_model_path(name) != wanted:
            raise ValueError(
                f"the SAE at {sae.cfg.hookpoint} was trained on model {name!r}, not {model_name!r}"
            )


def write_feature_circuit(options) -> dict:
    """`options` as `sae.cli.feature_circuit.FeatureCircuitOptions`. Returns the report it writes."""
    from sae.formats import load
    from sae.lm import load_model

    out = Path(options.out)
    saes = [load(path, device=options.device).eval() for path in options.saes]
    check_saes_match(saes, options.model)
    if options.dashboards and len(options.dashboards) != len(saes):
        raise ValueError(f"--dashboards: one per SAE ({len(saes)}), got {len(options.dashboards)}")
    explanations = _explanations(options, saes)
    model = load_model(options.model, options.dtype, options.device)
    spliced = SplicedModel(model, saes)
    task = build_task(options.task, model, options.prompts, options.seed)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(step: str, fn, *args, **kwargs):
        started = time.perf_counter()
        value = fn(*args, **kwargs)
        timings[step] = time.perf_counter() - started
        print(f"{step}: {timings[step]:.1f} s")
        return value

    check = _task_check(spliced, task)
    effects = timed("nodes", node_effects, spliced, task, options.method, options.steps)
    graph_nodes = ranked_nodes(effects, n=options.graph_nodes)
    edges = timed("edges", feature_edges, spliced, task, graph_nodes, options.edges_per_node)
    report = {
        "options": dict(vars(options)),
        "task_check": check,
        "method": {"name": effects.method, "forwards": effects.forwards, "backwards": effects.backwards},
        "heads": {h: effects.heads(h).tolist() for h in effects.head_latents},
        "heads_from_latents": {h: effects.head_latents[h].sum(0).tolist() for h in effects.head_latents},
        "curves": {},
        "raw_basis_curves": {},
    }
    sizes = sorted(set(options.sizes))
    for ablation in options.ablations:
        report["curves"][ablation] = timed(
            f"curves ({ablation})", curves, spliced, task, effects, sizes, ablation, options.random_draws
        ).as_dict()
    if options.raw_basis:
        raw = SplicedModel(model, [raw_basis_of(s) for s in saes])
        raw_effects = timed("raw-basis nodes", node_effects, raw, task, options.method, options.steps)
        for ablation in options.ablations:
            report["raw_basis_curves"][ablation] = timed(
                f"raw-basis curves ({ablation})", curves, raw, task, raw_effects, sizes, ablation, 0
            ).as_dict()
    if options.check_per_site:
        others = [
            node_effects(spliced, task, m, options.steps) for m in options.compare if m != options.method
        ]
        result = timed(
            "patching check", patching_check, spliced, task, [effects, *others], options.check_per_site
        )
        report["patching_check"] = {"pearson": result.pearson(), "forwards": result.forwards}
    clean = site_values(spliced, task.clean_tokens)
    report["graph"] = _graph(spliced, task, graph_nodes, effects, edges, clean, explanations, options)
    report["edges_cost"] = {"forwards": edges.forwards, "backwards": edges.backwards}
    report["seconds"] = timings
    atomic_write_json(out / "report.json", report)
    atomic_write_bytes(out / "curves.png", curves_png(report, f"{options.task}: {effects.method}"))
    atomic_write_text(out / "graph.html", graph_html(report["graph"], f"{options.task}: feature circuit"))
    print(f"wrote {out / 'report.json'}, {out / 'curves.png'}, {out / 'graph.html'}")
    return report


def _task_check(spliced: SplicedModel, task: Task) -> dict:
    with torch.no_grad():
        clean = spliced.model(task.clean_tokens.to(spliced.model.cfg.device))[:, -1]
        corrupted = spliced.model(task.corrupted_tokens.to(spliced.model.cfg.device))[:, -1]
    return {
        "prompts": len(task),
        "clean_solved": float(task_solved(task, clean).float().mean()),
        "clean_metric": float(task_metric(task, clean).mean()),
        "corrupted_metric": float(task_metric(task, corrupted).mean()),
    }


def _explanations(options, saes) -> dict[str, dict]:
    """hookpoint -> {latent: explanation text} from `--explanations HOOKPOINT=FILE` entries."""
    from sae.analysis.dashboard import read_explanations

    hookpoints = {sae.cfg.hookpoint for sae in saes}
    table: dict[str, dict] = {}
    for entry in options.explanations:
        hookpoint, sep, path = entry.partition("=")
        if not sep or hookpoint not in hookpoints:
            raise ValueError(
                f"--explanations {entry!r}: expected HOOKPOINT=FILE with a spliced hookpoint "
                f"({', '.join(sorted(hookpoints))})"
            )
        table[hookpoint] = {k: e.explanation for k, e in read_explanations(path).items()}
    return table


def _graph(
    spliced: SplicedModel,
    task: Task,
    nodes: list[Node],
    effects: NodeEffects,
    edges,
    clean: dict[str, SiteNodes],
    explanations: dict[str, dict],
    options,
) -> dict:
    """The graph as `graph_html` draws it: nodes with their top prompts, edges, token labels."""
    tokenizer = spliced.model.tokenizer
    first_prompt = task.clean_tokens[0].tolist()
    dashboards = dict(
        zip([s.cfg.hookpoint for s in spliced.saes.values()], options.dashboards or [], strict=False)
    )

    def node_id(node: Node) -> str:
        return f"{node.site}|{node.position}|{node.latent}"

    graph_nodes = []
    for node in nodes:
        if node.latent == ERROR:
            effect, examples, explanation, page = effects.errors[node.site][node.position], [], None, None
        else:
            effect = effects.latents[node.site][node.position, node.latent]
            values = clean[node.site].latents[:, node.position, node.latent]  # [prompts]
            top = values.argsort(descending=True)[:3]
            examples = [
                {"text": tokenizer.decode(task.clean_tokens[i, 1:]), "activation": float(values[i])}
                for i in top.tolist()
                if values[i] != 0
            ]
            explanation = explanations.get(node.site, {}).get(node.latent)
            page = f"{dashboards[node.site]}/latent.html#{node.latent}" if node.site in dashboards else None
        graph_nodes.append(
            {
                "id": node_id(node),
                "site": node.site,
                "position": node.position,
                "latent": node.latent,
                "effect": float(effect),
                "examples": examples,
                "explanation": explanation,
                "dashboard": page,
            }
        )
    kept = {n["id"] for n in graph_nodes}
    graph_edges = [
        {
            "source": node_id(e.upstream),
            "target": "metric" if e.downstream is None else node_id(e.downstream),
            "weight": e.weight,
        }
        for e in edges.edges
        if node_id(e.upstream) in kept and (e.downstream is None or node_id(e.downstream) in kept)
    ]
    return {
        "sites": spliced.hookpoints,
        "tokens": [tokenizer.decode([t]) for t in first_prompt],
        "nodes": graph_nodes,
        "edges": graph_edges,
    }


def curves_png(report: dict, title: str) -> bytes:
    """Faithfulness and completeness over N for each ablation: the circuit, random nodes, the raw basis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ablations = list(report["curves"])
    fig, axes = plt.subplots(1, len(ablations), figsize=(5.5 * len(ablations), 4), squeeze=False)
    for ax, ablation in zip(axes[0], ablations, strict=True):
        c = report["curves"][ablation]
        ax.plot(c["sizes"], c["faithfulness"], "o-", color="C0", label="faithfulness")
        ax.plot(c["sizes"], c["completeness"], "s-", color="C1", label="completeness (M∖C)")
        ax.plot(c["sizes"], c["random_faithfulness"], "o:", color="C0", alpha=0.5, label="random nodes")
        raw = report["raw_basis_curves"].get(ablation)
        if raw:
            ax.plot(raw["sizes"], raw["faithfulness"], "^--", color="C2", label="raw basis")
        ax.set_xscale("log")
        ax.set_xlabel("nodes in the circuit (N)")
        ax.set_title(f"{title} ({ablation} ablation)")
        ax.axhline(1, color="grey", lw=0.5)
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def raw_basis_of(sae: SparseAutoencoder) -> SparseAutoencoder:
    """The raw-basis control for `sae`: the dimensions of the site it writes (a transcoder's output site)."""
    if sae.cfg.transcoder:
        return raw_basis(output_hookpoint(sae), sae.cfg.d_out)
    return raw_basis(sae.cfg.hookpoint, sae.cfg.d_in, sae.cfg.hook_layout)
