"""The feature-circuit pipeline on toy induction models, whose circuit is known by construction.

    python studies/feature_circuits/toy_induction.py --out out/fc_toy

For each toy of studies/circuits/toy_induction.py (default: "2l4h" and "2l8h_distractors", seed 0):
1. train the toy (a 2-layer attention-only GPT-NeoX on repeated random segments) or reuse it from OUT;
2. cache its activations at each layer's `hook_z` and at the residual stream after layer 0 with the
   library's cache stage, then train one TopK SAE per site for each seed, all through `sae-train`
   (`train_saes.sh` at toy scale: one cache pass shared by the seeds, `sae.hookpoints="all"`, eval off).
   The text is the toy's own training distribution written as words (`t5 t17 ...`, one row per
   document; context 25 = BOS, 23 tokens of a training row, the separator the packing appends);
3. on the induction task (`tasks.induction` over the toy's vocabulary, as studies/circuits poses it):
   (a) previous-token and induction heads from attention patterns alone (mass >= 0.5); the exhaustive
   resample-patching ground truth of heads (|effect| >= 10% of the clean-corrupted gap); the head
   rankings of the hook_z SAEs (latents + error, latents alone) beside the raw-head baselines, with ROC
   AUC and whether the top head of each layer is one the attention patterns name;
   (b) the feature circuit over all spliced sites by the steps of `sae-analyze feature-circuit` (node
   effects, edges into the top nodes, faithfulness and completeness curves under mean and resample
   ablation with the random-latent and raw-basis controls), plus where the node effects sit and a
   mean-ablation curve with the prompts' shared positions kept; (c) the patching check; (d) the seconds
   of every step; and `sae-analyze feature-circuit --task induction` itself on the first seed's SAEs
   (its prompts come from `build_task`, see `cli_check`).
Writes OUT/<toy>/ (model, text, cache, SAEs, the command's own report) and, under --results,
report.json (everything), heads.md and circuit.md (the tables).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

from sae.analysis.circuits import evaluation, patching
from sae.analysis.circuits.feature_attribution import node_effects, patching_check, site_values
from sae.analysis.circuits.feature_circuit import (
    ERROR,
    ablation_nodes,
    circuit_of,
    curves,
    metric_with,
    ranked_nodes,
)
from sae.analysis.circuits.feature_edges import feature_edges
from sae.analysis.circuits.feature_report import check_saes_match, raw_basis_of
from sae.analysis.circuits.methods import layer_index_scores, run_method
from sae.analysis.circuits.splice import SplicedModel
from sae.analysis.circuits.tasks import task_metric, task_solved
from sae.cli.train import main as sae_train
from sae.formats import load
from sae.io import atomic_write_json, atomic_write_text
from sae.lm import capture, load_model

HERE = Path(__file__).resolve().parent
CONTEXT = 25  # BOS + 23 tokens of a training row + the separator the packing appends
NODE_METHODS = ("attribution_patching", "relp", "integrated_gradients")
SIZES = [1, 2, 5, 10, 20, 50, 100, 200, 500]
ATTENTION_THRESHOLD = 0.5  # attention mass that names a previous-token or induction head (fixed in advance)


def toy_module():
    """studies/circuits/toy_induction.py, imported under its own name (this file has the same one)."""
    path = HERE.parent / "circuits" / "toy_induction.py"
    spec = importlib.util.spec_from_file_location("circuits_toy_induction", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOY = toy_module()


def hookpoints(n_layers: int, resid: bool) -> list[str]:
    sites = [f"blocks.{L}.attn.hook_z" for L in range(n_layers)]
    return sites + (["blocks.0.hook_resid_post"] if resid else [])


# --- 1. the toy ------------------------------------------------------------------------------------------


def build_toy(directory: Path, toy: str, seed: int, steps: int) -> dict:
    """Train the toy into directory/model, or reuse it when training.json records the same settings."""
    record = directory / "training.json"
    wanted = {"toy": toy, "seed": seed, "steps": steps}
    if record.is_file() and (directory / "model" / "config.json").is_file():
        saved = json.loads(record.read_text())
        if {k: saved.get(k) for k in wanted} == wanted:
            return saved | {"reused": True}
    started = time.perf_counter()
    info = TOY.train_induction_model(directory / "model", steps=steps, seed=seed, **TOY.TOYS[toy])
    info |= wanted | {"seconds": time.perf_counter() - started}
    atomic_write_json(record, info)
    return info | {"reused": False}


# --- 2. text, cache and SAEs ----------------------------------------------------------------------------


def write_text(path: Path, model_dir: Path, toy: str, tokens: int, seed: int) -> int:
    """The toy's training distribution as a .jsonl of documents (one training row each, BOS and last
    token dropped), enough for `tokens` cached tokens; fresh rows (generator seed + 1,000). -> rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = -(-tokens // (CONTEXT - 1)) + 16
    generator = torch.Generator().manual_seed(seed + 1_000)
    ids, _ = TOY.repeated_sequences(rows, TOY.N_TOKENS, generator)
    n_retrieval = round(TOY.TOYS[toy]["retrieval_fraction"] * rows)
    if n_retrieval:  # the same mixture the toy was trained on
        ids[:n_retrieval] = TOY.retrieval_sequences(
            n_retrieval, TOY.N_TOKENS, TOY.N_TOKENS + 2, generator, ids.shape[1]
        )
        ids = ids[torch.randperm(rows, generator=generator)]
    lines = [
        json.dumps({"text": " ".join(tokenizer.convert_ids_to_tokens(row[1 : CONTEXT - 1].tolist()))})
        for row in ids
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return rows


def train_saes(directory: Path, sites: list[str], args, seed: int) -> dict:
    """`sae-train` with one cache (shared by the seeds) and one TopK SAE per site. -> its report."""
    out_dir = sae_dir(directory, args, seed)
    if (out_dir / "report.json").is_file():
        return json.loads((out_dir / "report.json").read_text()) | {"reused": True}
    sites_toml = "[" + ", ".join(f'"{h}"' for h in sites) + "]"
    sets = {
        "model.name": str(directory / "model"),
        "model.dtype": '"float32"',
        "data.dataset": str(text_path(directory, args)),
        "data.context_size": CONTEXT,
        "cache.hookpoints": sites_toml,
        "cache.tokens": args.tokens,
        "cache.dir": str(directory / f"cache_{args.tokens}"),
        "cache.dtype": '"float32"',
        "cache.batch_contexts": 64,
        "cache.shard_contexts": 1024,
        "sae.hookpoints": '"all"',
        "sae.d_sae": args.d_sae,
        "sae.k": args.k,
        "train.batch_size": args.batch_size,
        "train.dead_after_tokens": args.dead_after_tokens,
        "train.seed": seed,
        "train.out_dir": str(out_dir),
        "eval.enabled": "false",
    }
    argv = [item for key, value in sets.items() for item in ("--set", f"{key}={_toml(value)}")]
    if sae_train(argv) != 0:
        raise RuntimeError(f"sae-train failed for seed {seed}: {argv}")
    return json.loads((out_dir / "report.json").read_text()) | {"reused": False}


def _toml(value) -> str:
    """A --set value: strings that are not already TOML literals get quoted."""
    if isinstance(value, str) and not value.startswith(("[", '"')) and value not in ("true", "false"):
        return json.dumps(value)
    return str(value)


def text_path(directory: Path, args) -> Path:
    return directory / "text" / f"train_{args.tokens}.jsonl"


def sae_dir(directory: Path, args, seed: int) -> Path:
    """One folder per training setting, so that a changed setting trains afresh instead of reusing."""
    setting = f"t{args.tokens}_d{args.d_sae}_k{args.k}_b{args.batch_size}_dead{args.dead_after_tokens}"
    return directory / "saes" / setting / f"seed{seed}"


def trained_saes(directory: Path, args, seed: int) -> dict:
    """hookpoint -> the SAE of `seed`."""
    found = {}
    for cfg in sorted(sae_dir(directory, args, seed).rglob("cfg.json")):
        found[json.loads(cfg.read_text())["hookpoint"]] = load(str(cfg.parent)).eval()
    return found


def training_metrics(directory: Path, args, seed: int) -> dict:
    """hookpoint -> the last logged FVU, L0 and dead fraction of its SAE's training."""
    table = {}
    for metrics in sorted(sae_dir(directory, args, seed).rglob("metrics.json")):
        cfg = json.loads((metrics.parent / "cfg.json").read_text())
        m = json.loads(metrics.read_text())
        table[cfg["hookpoint"]] = {k: m.get(k) for k in ("fvu", "l0", "dead_fraction", "tokens") if k in m}
    return table


# --- 3a. heads -------------------------------------------------------------------------------------------


def attention_scores(model, task) -> dict:
    """Per head [layers, heads], from attention patterns on the clean prompts [BOS, A_1..A_half, A_1..A_q]:
    previous-token score, mean attention of positions 2.. to the position before; induction score, mean
    attention of the second copy's positions to the position after the earlier occurrence of their token;
    first-token score, mean attention of positions 2.. to position 1 (what the distractor rule reads)."""
    half = TOY.HALF
    tokens = task.clean_tokens
    length = tokens.shape[1]
    names = [f"blocks.{L}.attn.hook_pattern" for L in range(model.cfg.n_layers)]
    acts = capture(model, tokens, names, None)
    patterns = torch.stack([acts[n].float() for n in names], 1)  # [prompts, layers, heads, q, k]
    query = torch.arange(2, length)
    second = torch.arange(half + 1, length)
    return {
        "previous_token": patterns[..., query, query - 1].mean((0, -1)),
        "induction": patterns[..., second, second - half + 1].mean((0, -1)),
        "first_token": patterns[..., query, 1].mean((0, -1)),
    }


def known_heads(scores: dict) -> dict:
    """The circuit the attention patterns name, without patching: previous-token heads (layer 0,
    previous-token score >= ATTENTION_THRESHOLD) and induction heads (layer 1, induction score >= it);
    [layer, head] pairs, and the mask [layers, heads]."""
    prev = [[0, h] for h, s in enumerate(scores["previous_token"][0].tolist()) if s >= ATTENTION_THRESHOLD]
    ind = [[1, h] for h, s in enumerate(scores["induction"][1].tolist()) if s >= ATTENTION_THRESHOLD]
    mask = torch.zeros_like(scores["induction"], dtype=torch.bool)
    for layer, head in prev + ind:
        mask[layer, head] = True
    return {"previous_token": prev, "induction": ind, "mask": mask}


def ground_truth(model, task) -> tuple[torch.Tensor, dict]:
    """Exhaustive resample patching of every head; truth = |effect| >= 10% of the clean-corrupted gap (the
    threshold of studies/circuits and study.py)."""
    run = patching.exhaustive_head_patching(model, task, "resample")
    with torch.no_grad():
        corrupted = float(task_metric(task, model(task.corrupted_tokens)[:, -1]).mean())
    clean = run.details["clean_metric"]
    truth = patching.ground_truth_from_effects(run.details["effects"], clean, corrupted)
    return truth, {
        "effects_resample": run.details["effects"].tolist(),
        "clean_metric": clean,
        "corrupted_metric": corrupted,
        "ground_truth": truth.int().tolist(),
        "seconds": run.seconds,
    }


def head_entry(scores: torch.Tensor, truth: torch.Tensor, known: dict, seconds: float) -> dict:
    """evaluate() against the patching truth; the AUC against the circuit the attention patterns name;
    the top head of each layer and whether it is a previous-token (layer 0) or induction (layer 1) head."""
    entry = evaluation.evaluate(scores, truth)
    mask = known["mask"]
    entry["roc_auc_vs_attention"] = (
        evaluation.roc_auc(scores, mask) if mask.any() and not mask.all() else None
    )
    top0, top1 = int(scores[0].argmax()), int(scores[1].argmax())
    entry["top_layer0"] = [0, top0]
    entry["top_layer1"] = [1, top1]
    entry["top_layer0_is_previous_token"] = [0, top0] in known["previous_token"]
    entry["top_layer1_is_induction"] = [1, top1] in known["induction"]
    entry["scores"] = scores.tolist()
    entry["seconds"] = seconds
    return entry


# --- 3b-d. the feature circuit ----------------------------------------------------------------------------


def task_check(model, task) -> dict:
    with torch.no_grad():
        clean = model(task.clean_tokens)[:, -1]
        corrupted = model(task.corrupted_tokens)[:, -1]
    return {
        "prompts": len(task),
        "clean_solved": float(task_solved(task, clean).float().mean()),
        "clean_metric": float(task_metric(task, clean).mean()),
        "corrupted_metric": float(task_metric(task, corrupted).mean()),
    }


def task_fvu(spliced: SplicedModel, task) -> dict:
    """Each SAE's fraction of variance unexplained on the task's clean and corrupted prompts (positions
    after BOS): how much the error nodes have to carry there."""
    result = {}
    for name, tokens in (("clean", task.clean_tokens), ("corrupted", task.corrupted_tokens)):
        for h, nodes in site_values(spliced, tokens).items():
            x, err = nodes.input[:, spliced.first :], nodes.error[:, spliced.first :]
            total = (x - x.mean((0, 1))).pow(2).sum()
            result.setdefault(h, {})[name] = float(err.pow(2).sum() / total)
    return result


def head_of_latent(sae, latent: int, n_heads: int) -> tuple[int, float] | None:
    """For a hook_z SAE: the head whose slice of the latent's decoder row is largest, and its share of the
    row's squared norm."""
    if sae.cfg.hook_layout != "heads":
        return None
    row = sae.W_dec[latent].detach().float().unflatten(-1, (n_heads, -1)).pow(2).sum(-1)
    head = int(row.argmax())
    return head, float(row[head] / row.sum())


def describe_nodes(spliced: SplicedModel, effects, n: int, n_heads: int) -> list[dict]:
    rows = []
    for node in ranked_nodes(effects, n=n):
        if node.latent == ERROR:
            effect, head = effects.errors[node.site][node.position], None
        else:
            effect = effects.latents[node.site][node.position, node.latent]
            head = head_of_latent(spliced.saes[node.site], node.latent, n_heads)
        rows.append(
            {
                "site": node.site,
                "position": node.position,
                "latent": "error" if node.latent == ERROR else node.latent,
                "effect": float(effect),
                "head": None if head is None else head[0],
                "head_share": None if head is None else round(head[1], 3),
            }
        )
    return rows


def expected_positions(spliced: SplicedModel, task) -> dict[str, int]:
    """Where the known circuit reads, by construction: layer-0 sites at the first copy's A_{q+1} (position
    q + 1: the token the induction head copies, and the previous-token head's output there, "A_q came
    before"), layer-1 sites at the last position (A_q, where the induction head attends back)."""
    last = task.clean_tokens.shape[1] - 1
    query = last - TOY.HALF  # prompts [BOS, A_1..A_half, A_1..A_q]: last = half + q
    return {h: query + 1 if h.startswith("blocks.0.") else last for h in spliced.hookpoints}


def effect_by_position(effects) -> dict:
    """site -> [pos]: the sum of |latent effects| + |error effect| at each position."""
    return {h: (effects.latents[h].abs().sum(1) + effects.errors[h].abs()).tolist() for h in effects.latents}


def share_at(by_position: dict, where: dict[str, int]) -> float:
    """The fraction of all |effect| (every site and position) at the given (site, position) pairs."""
    total = sum(sum(v) for v in by_position.values())
    return sum(by_position[h][p] for h, p in where.items()) / total


def active_nodes(spliced: SplicedModel, task, where: dict[str, int]) -> dict:
    """site -> latent nodes (position, latent) active on some clean or corrupted prompt, in all and at the
    site's expected position: the most a latent circuit may need there under resample ablation."""
    clean, corrupt = site_values(spliced, task.clean_tokens), site_values(spliced, task.corrupted_tokens)
    table = {}
    for h in spliced.hookpoints:
        active = ((clean[h].latents != 0) | (corrupt[h].latents != 0)).any(0)  # [pos, d_sae]
        active[: spliced.first] = False
        table[h] = {"all": int(active.sum()), "at_expected_position": int(active[where[h]].sum())}
    return table


def shared_positions_faithfulness(spliced: SplicedModel, task, effects) -> dict:
    """Mean-ablation faithfulness with every node at the positions whose tokens clean and corrupted
    prompts share (the second copy, A_1..A_q) kept besides the top N. Mean ablation sets those nodes to
    their mean over prompts (an average of other random tokens) though patching them changes nothing
    (clean = corrupted there, estimate ~0), so no top-N circuit holds them; this tests that reading."""
    shared = (task.clean_tokens == task.corrupted_tokens).all(0)
    shared[: spliced.first] = False
    ablated = ablation_nodes(site_values(spliced, task.corrupted_tokens), "mean")
    positions = task.clean_tokens.shape[1]
    full = metric_with(spliced, task, None, ablated)
    empty = metric_with(spliced, task, circuit_of([], spliced, positions), ablated)
    ranked = ranked_nodes(effects, n=max(SIZES))
    sizes, faithfulness = [0, *SIZES], []
    for n in sizes:
        circuit = circuit_of(ranked[:n], spliced, positions)
        for mask in circuit.values():
            mask.latents[shared] = True
            mask.error[shared] = True
        faithfulness.append((metric_with(spliced, task, circuit, ablated) - empty) / (full - empty))
    return {
        "shared_positions": shared.nonzero().flatten().tolist(),
        "sizes": sizes,
        "faithfulness": faithfulness,
    }


def feature_circuit(model, task, saes: dict, args) -> dict:
    """The steps of `sae-analyze feature-circuit` (write_feature_circuit) on the toy's own task."""
    timings: dict[str, float] = {}

    def timed(step: str, fn, *a, **kw):
        started = time.perf_counter()
        value = fn(*a, **kw)
        timings[step] = time.perf_counter() - started
        return value

    ordered = [saes[h] for h in saes]
    check_saes_match(ordered, str(args.model_dir))
    spliced = SplicedModel(model, ordered)
    effects = timed("nodes", node_effects, spliced, task, args.method, args.steps)
    where = expected_positions(spliced, task)
    by_position = effect_by_position(effects)
    graph_nodes = ranked_nodes(effects, n=args.graph_nodes)
    edges = timed("edges", feature_edges, spliced, task, graph_nodes, args.edges_per_node)
    report = {
        "method": {"name": effects.method, "forwards": effects.forwards, "backwards": effects.backwards},
        "graph_nodes": len(graph_nodes),
        "fvu_on_task": task_fvu(spliced, task),
        "top_nodes": describe_nodes(spliced, effects, 15, model.cfg.n_heads),
        "effect_by_position": by_position,
        "expected_positions": where,
        "effect_share_at_expected_positions": share_at(by_position, where),
        "active_nodes": active_nodes(spliced, task, where),
        "curves": {},
        "raw_basis_curves": {},
    }
    for ablation in ("mean", "resample"):
        report["curves"][ablation] = timed(
            f"curves ({ablation})", curves, spliced, task, effects, SIZES, ablation, args.random_draws
        ).as_dict()
    report["mean_ablation_shared_positions_kept"] = timed(
        "curve (mean, shared positions kept)", shared_positions_faithfulness, spliced, task, effects
    )
    raw = SplicedModel(model, [raw_basis_of(s) for s in ordered])
    raw_effects = timed("raw-basis nodes", node_effects, raw, task, args.method, args.steps)
    for ablation in ("mean", "resample"):
        report["raw_basis_curves"][ablation] = timed(
            f"raw-basis curves ({ablation})", curves, raw, task, raw_effects, SIZES, ablation, 0
        ).as_dict()
    others = [node_effects(spliced, task, m, args.steps) for m in NODE_METHODS if m != args.method]
    check = timed("patching check", patching_check, spliced, task, [effects, *others], args.check_per_site)
    report["patching_check"] = {
        "pearson": check.pearson(),
        "forwards": check.forwards,
        "latents": sum(len(p) for p in check.patched.values()),
    }
    report["edges"] = [
        {
            "from": _node_name(e.upstream),
            "to": "metric" if e.downstream is None else _node_name(e.downstream),
            "weight": e.weight,
        }
        for e in sorted(edges.edges, key=lambda e: -abs(e.weight))[:20]
    ]
    report["edge_groups"] = edge_groups(edges.edges)
    report["edges_cost"] = {"forwards": edges.forwards, "backwards": edges.backwards}
    report["seconds"] = timings
    return report


def edge_groups(edges) -> list[dict]:
    """The kept edges summed by (upstream site@position -> downstream site@position or the metric), by
    decreasing sum of |weight|: which slots the circuit wires together."""
    groups: dict[tuple[str, str], list[float]] = {}
    for e in edges:
        into = "metric" if e.downstream is None else f"{e.downstream.site}@{e.downstream.position}"
        groups.setdefault((f"{e.upstream.site}@{e.upstream.position}", into), []).append(e.weight)
    rows = [
        {"from": a, "to": b, "edges": len(w), "sum_abs": sum(map(abs, w)), "sum": sum(w)}
        for (a, b), w in groups.items()
    ]
    return sorted(rows, key=lambda r: -r["sum_abs"])


def _node_name(node) -> str:
    latent = "err" if node.latent == ERROR else str(node.latent)
    return f"{node.site}@{node.position}#{latent}"


def cli_check(directory: Path, args, seed: int, truth: torch.Tensor) -> dict:
    """`sae-analyze feature-circuit --task induction` itself on the toy and the SAEs of `seed`. Its task is
    `build_task("induction")`, which drew tokens from ids 100..d_vocab-1 when the README's figures were
    measured: on the toy (130 ids) 30 tokens, <unk> (id 129, never trained) among them; it now leaves out
    special tokens. -> its task check, its hook_z head estimates' AUC against this study's ground truth,
    and its seconds."""
    from sae.analysis.circuits.tasks import build_task
    from sae.cli.analyze import main as sae_analyze

    out = directory / f"cli_seed{seed}"
    saes = [str(c.parent) for c in sorted(sae_dir(directory, args, seed).rglob("cfg.json"))]
    argv = ["feature-circuit", "--task", "induction", "--model", str(args.model_dir), "--saes", *saes]
    argv += ["--out", str(out), "--prompts", str(args.prompts), "--seed", "0"]
    started = time.perf_counter()
    if sae_analyze(argv) != 0:
        raise RuntimeError(f"sae-analyze failed: {argv}")
    seconds = time.perf_counter() - started
    report = json.loads((out / "report.json").read_text())
    layers = truth.shape[0]
    heads = torch.tensor([report["heads"][f"blocks.{L}.attn.hook_z"] for L in range(layers)]).abs()
    latents = torch.tensor([report["heads_from_latents"][f"blocks.{L}.attn.hook_z"] for L in range(layers)])
    model = load_model(str(args.model_dir))
    task = build_task("induction", model, args.prompts, 0)
    unk_id = model.tokenizer.unk_token_id
    unk = task.clean_tokens == unk_id
    return {
        "command": "sae-analyze " + " ".join(argv),
        "task_check": report["task_check"],
        "token_ids": [int(task.clean_tokens[:, 1:].min()), int(task.clean_tokens.max())],
        "prompts_with_unk": int(unk.any(1).sum()),
        "answers_unk": int((task.good_tokens[:, 0] == unk_id).sum()),
        "roc_auc_heads": evaluation.roc_auc(heads, truth),
        "roc_auc_heads_latents": evaluation.roc_auc(latents.abs(), truth),
        "faithfulness_resample_500": report["curves"]["resample"]["faithfulness"][-1],
        "seconds": seconds,
        "step_seconds": report["seconds"],
    }


# --- one toy ---------------------------------------------------------------------------------------------


def run_toy(toy: str, args) -> dict:
    directory = args.out / toy
    seconds: dict[str, float] = {}
    training = build_toy(directory, toy, args.toy_seed, args.toy_steps)
    # a reused step reports the seconds it took when it ran (training.json, sae-train's report.json)
    seconds["toy training"] = training["seconds"]
    print(f"[{toy}] toy: induction loss {training['induction_loss']} ({seconds['toy training']:.0f} s)")
    args.model_dir = directory / "model"
    model = load_model(str(args.model_dir))
    sites = hookpoints(model.cfg.n_layers, args.resid)

    started = time.perf_counter()
    text = text_path(directory, args)
    if not text.is_file():
        write_text(text, args.model_dir, toy, args.tokens, args.toy_seed)
    seconds["text"] = time.perf_counter() - started
    saes_info = {}
    for seed in args.seeds:
        report = train_saes(directory, sites, args, seed)
        stages = report.get("seconds", {})
        seconds[f"cache (seed {seed} run)"] = stages.get("cache", 0.0)
        seconds[f"sae training seed {seed} ({len(sites)} SAEs)"] = stages.get("train", 0.0)
        saes_info[seed] = {
            "reused": report["reused"],
            "cache_tokens": report["cache"]["tokens"],
            "training": training_metrics(directory, args, seed),
            "train_seconds": stages.get("train"),
            "cache_seconds": stages.get("cache"),
        }
        print(f"[{toy}] SAEs seed {seed}: {saes_info[seed]['training']}")

    task = TOY.induction_task(args.prompts, seed=0)
    check = task_check(model, task)
    started = time.perf_counter()
    attention = attention_scores(model, task)
    known = known_heads(attention)
    seconds["attention patterns"] = time.perf_counter() - started
    truth, truth_info = ground_truth(model, task)
    seconds["ground truth (exhaustive patching)"] = truth_info["seconds"]
    named = {k: v for k, v in known.items() if k != "mask"}
    print(f"[{toy}] task {check}; truth {truth.int().tolist()}; named by attention {named}")

    heads: dict[str, list[dict]] = {}

    def add(name: str, scores: torch.Tensor, took: float) -> None:
        heads.setdefault(name, []).append(head_entry(scores, truth, known, took))

    for name in ("attribution_patching", "relp", "eap_ig"):
        run = run_method(name, model, task)
        add(name, run.scores, run.seconds)
    add("layer_index", layer_index_scores(model).scores, 0.0)
    add("attention: previous-token score", attention["previous_token"], 0.0)
    add("attention: induction score", attention["induction"], 0.0)

    circuits = {}
    for seed in args.seeds:
        saes = trained_saes(directory, args, seed)
        z_saes = [saes[f"blocks.{L}.attn.hook_z"] for L in range(model.cfg.n_layers)]
        spliced = SplicedModel(model, z_saes)
        for method in NODE_METHODS:
            effects = node_effects(spliced, task, method, steps=args.steps)
            whole = torch.stack([effects.heads(s.cfg.hookpoint) for s in z_saes])  # [layers, heads]
            latents = torch.stack([effects.head_latents[s.cfg.hookpoint].sum(0) for s in z_saes])
            add(f"sae_{method}", whole.abs(), effects.seconds)
            add(f"sae_{method}_latents", latents.abs(), effects.seconds)
        started = time.perf_counter()
        circuits[seed] = feature_circuit(model, task, saes, args)
        print(f"[{toy}] feature circuit seed {seed}: {time.perf_counter() - started:.1f} s")
    cli = cli_check(directory, args, args.seeds[0], truth) if args.cli_check else None
    return {
        "toy": toy,
        "training": training,
        "sites": sites,
        "saes": saes_info,
        "task_check": check,
        "attention": {k: v.tolist() for k, v in attention.items()},
        "known_heads": {k: v for k, v in known.items() if k != "mask"},
        "ground_truth": truth_info,
        "heads": heads,
        "circuits": circuits,
        "cli_check": cli,
        "seconds": seconds,
    }


# --- tables ----------------------------------------------------------------------------------------------


def _mean_sd(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _head(layer_head) -> str:
    return f"L{layer_head[0]}H{layer_head[1]}"


def heads_markdown(result: dict) -> str:
    truth = result["ground_truth"]
    known = result["known_heads"]
    attention = result["attention"]
    check = result["task_check"]
    n_layers, n_heads = len(truth["ground_truth"]), len(truth["ground_truth"][0])
    in_truth = [_head((L, h)) for L in range(n_layers) for h in range(n_heads) if truth["ground_truth"][L][h]]
    prev = ", ".join(map(_head, known["previous_token"])) or "none"
    ind = ", ".join(map(_head, known["induction"])) or "none"
    lines = [
        f"### {result['toy']}",
        "",
        f"Task: {check['prompts']} prompts, clean metric {check['clean_metric']:.2f} (solved "
        f"{check['clean_solved']:.2f}), corrupted {check['corrupted_metric']:.2f}. Ground truth (resample "
        f"patching, |effect| >= 10% of the gap): {', '.join(in_truth)}. Named by attention (score >= "
        f"{ATTENTION_THRESHOLD}): previous-token heads {prev}; induction heads {ind}.",
        "",
        "| head | previous-token attn | induction attn | first-token attn | patching effect | in truth |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for L in range(n_layers):
        for h in range(n_heads):
            lines.append(
                f"| {_head((L, h))} | {attention['previous_token'][L][h]:.2f} | "
                f"{attention['induction'][L][h]:.2f} | {attention['first_token'][L][h]:.2f} | "
                f"{truth['effects_resample'][L][h]:.2f} | {'yes' if truth['ground_truth'][L][h] else ''} |"
            )
    lines += [
        "",
        "| method | ROC AUC | AUC within layers | P@k | AUC vs attention-named heads | top L0 head "
        "| top L1 head | runs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in result["heads"].items():
        top0 = _tops([r["top_layer0"] for r in runs], [r["top_layer0_is_previous_token"] for r in runs])
        top1 = _tops([r["top_layer1"] for r in runs], [r["top_layer1_is_induction"] for r in runs])
        lines.append(
            f"| {name} | {_mean_sd([r['roc_auc'] for r in runs])} | "
            f"{_mean_sd([r['roc_auc_within_layers'] for r in runs])} | "
            f"{_mean_sd([r['at_k']['precision'] for r in runs])} | "
            f"{_mean_sd([r['roc_auc_vs_attention'] for r in runs])} | {top0} | {top1} | {len(runs)} |"
        )
    return "\n".join(lines) + "\n"


def _tops(heads: list, named: list[bool]) -> str:
    """'L0H3 ×3 (named)': each distinct top head, how many runs, whether attention names it."""
    counts: dict[str, list] = {}
    for head, ok in zip(heads, named, strict=True):
        counts.setdefault(_head(head), [0, ok])[0] += 1
    return ", ".join(f"{h} ×{n}" + (" (named)" if ok else "") for h, (n, ok) in counts.items())


def circuit_markdown(result: dict) -> str:
    circuits = result["circuits"]
    seeds = list(circuits)
    lines = [f"### {result['toy']}", ""]
    sae_rows = []
    for seed in seeds:
        for h, m in result["saes"][seed]["training"].items():
            fvu = circuits[seed]["fvu_on_task"][h]
            sae_rows.append((h, seed, m, fvu))
    lines += [
        "| site | training FVU | L0 | dead | FVU on clean prompts | FVU on corrupted prompts |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for h in result["sites"]:
        rows = [r for r in sae_rows if r[0] == h]
        lines.append(
            f"| {h} | {_mean_sd([r[2].get('fvu') for r in rows])} | "
            f"{_mean_sd([r[2].get('l0') for r in rows], 1)} | "
            f"{_mean_sd([r[2].get('dead_fraction') for r in rows])} | "
            f"{_mean_sd([r[3]['clean'] for r in rows])} | {_mean_sd([r[3]['corrupted'] for r in rows])} |"
        )
    lines += ["", "| N | " + " | ".join(str(n) for n in SIZES) + " |", "| --- |" + " --- |" * len(SIZES)]

    def row(label: str, values: list[list[float]]) -> str:
        cells = [_mean_sd([v[i] for v in values], 2) for i in range(len(SIZES))]
        return f"| {label} | " + " | ".join(cells) + " |"

    for ablation in ("mean", "resample"):
        c = [circuits[s]["curves"][ablation] for s in seeds]
        raw = [circuits[s]["raw_basis_curves"][ablation] for s in seeds]
        lines += [
            row(f"faithfulness, {ablation}", [x["faithfulness"] for x in c]),
            row(f"random latents, {ablation}", [x["random_faithfulness"] for x in c]),
            row(f"raw basis, {ablation}", [raw[0]["faithfulness"]]),
            row(f"completeness, {ablation}", [x["completeness"] for x in c]),
            row(f"random completeness, {ablation}", [x["random_completeness"] for x in c]),
            row(f"raw-basis completeness, {ablation}", [raw[0]["completeness"]]),
        ]
    kept = [circuits[s]["mean_ablation_shared_positions_kept"] for s in seeds]
    lines.append(
        row(
            f"faithfulness, mean, + all nodes at positions {kept[0]['shared_positions']}",
            [x["faithfulness"][1:] for x in kept],
        )
    )
    lines += [
        "",
        f"Mean ablation with only those shared positions kept (N = 0): "
        f"{_mean_sd([x['faithfulness'][0] for x in kept], 2)}. Share of all |node effect| at the expected "
        f"positions ({', '.join(f'{h}@{p}' for h, p in circuits[seeds[0]]['expected_positions'].items())}): "
        f"{_mean_sd([circuits[s]['effect_share_at_expected_positions'] for s in seeds], 2)}. Active latent "
        "nodes (position, latent) on some clean or corrupted prompt, all positions / expected position: "
        + ", ".join(
            f"{h} {_mean_sd([circuits[s]['active_nodes'][h]['all'] for s in seeds], 0)} / "
            f"{_mean_sd([circuits[s]['active_nodes'][h]['at_expected_position'] for s in seeds], 0)}"
            for h in result["sites"]
        )
        + ".",
    ]
    methods = list(circuits[seeds[0]]["patching_check"]["pearson"])
    lines += [
        "",
        "Patching check (Pearson r of the estimate with real patching, "
        f"{circuits[seeds[0]]['patching_check']['latents']} latents):",
        "",
        "| method | " + " | ".join([*result["sites"], "all"]) + " |",
        "| --- |" + " --- |" * (len(result["sites"]) + 1),
    ]
    for m in methods:
        cells = [
            _mean_sd([circuits[s]["patching_check"]["pearson"][m][h] for s in seeds], 2)
            for h in [*result["sites"], "all"]
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    first = circuits[seeds[0]]
    lines += [
        "",
        f"Top nodes (seed {seeds[0]}, {first['method']['name']}; head: the head whose slice of the decoder "
        "row is largest, and its share):",
        "",
        "| site | position | latent | effect | head (share) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n in first["top_nodes"][:10]:
        head = "" if n["head"] is None else f"H{n['head']} ({n['head_share']:.2f})"
        lines.append(f"| {n['site']} | {n['position']} | {n['latent']} | {n['effect']:.3f} | {head} |")
    lines += [
        "",
        f"Edges kept into the top {first['graph_nodes']} nodes (seed {seeds[0]}), summed by slot:",
        "",
        "| from | to | edges | sum of weights | sum of |weights| |",
        "| --- | --- | --- | --- | --- |",
    ]
    for g in first["edge_groups"][:6]:
        lines.append(f"| {g['from']} | {g['to']} | {g['edges']} | {g['sum']:.3f} | {g['sum_abs']:.3f} |")
    steps = list(first["seconds"])
    lines += [
        "",
        "Seconds: "
        + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items())
        + "; the feature circuit per seed (mean over seeds): "
        + ", ".join(f"{s} {statistics.mean(circuits[x]['seconds'][s] for x in seeds):.1f}" for s in steps)
        + ".",
    ]
    cli = result.get("cli_check")
    if cli:
        lines += [
            "",
            f"`sae-analyze feature-circuit --task induction` itself on seed {seeds[0]}'s SAEs: its prompts "
            f"draw token ids {cli['token_ids'][0]}..{cli['token_ids'][1]} (<unk> in "
            f"{cli['prompts_with_unk']} clean prompts, the answer in {cli['answers_unk']}); solved "
            f"{cli['task_check']['clean_solved']:.2f}, clean metric {cli['task_check']['clean_metric']:.2f}; "
            f"its hook_z head estimates against this ground truth: ROC AUC {cli['roc_auc_heads']:.3f} "
            f"(latents alone {cli['roc_auc_heads_latents']:.3f}); resample faithfulness at N = 500 "
            f"{cli['faithfulness_resample_500']:.2f}; {cli['seconds']:.0f} s.",
        ]
    return "\n".join(lines) + "\n"


def _shown(value):
    """Paths relative to the working directory where they lie under it (no machine's absolute paths)."""
    if not isinstance(value, Path):
        return value
    try:
        return str(value.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("out/fc_toy"), help="models, text, caches, SAEs")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "toy_induction")
    parser.add_argument("--toys", nargs="+", default=["2l4h", "2l8h_distractors"], choices=list(TOY.TOYS))
    parser.add_argument("--toy-seed", type=int, default=0)
    parser.add_argument("--toy-steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of SAE training")
    parser.add_argument("--tokens", type=int, default=300_000, help="cached tokens per site")
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument(
        "--dead-after-tokens",
        type=int,
        default=50_000,
        help="a latent silent this long is dead and feeds AuxK (the default 10M never fires here)",
    )
    parser.add_argument("--no-resid", dest="resid", action="store_false", help="hook_z sites only")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--method", default="integrated_gradients", choices=NODE_METHODS)
    parser.add_argument("--steps", type=int, default=10, help="integrated-gradients steps")
    parser.add_argument("--random-draws", type=int, default=3)
    parser.add_argument("--graph-nodes", type=int, default=30)
    parser.add_argument("--edges-per-node", type=int, default=8)
    parser.add_argument("--check-per-site", type=int, default=32)
    parser.add_argument(
        "--no-cli-check",
        dest="cli_check",
        action="store_false",
        help="skip running sae-analyze feature-circuit itself on the first seed's SAEs",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = [run_toy(toy, args) for toy in args.toys]
    total = time.perf_counter() - started
    args.results.mkdir(parents=True, exist_ok=True)
    options = {k: _shown(v) for k, v in vars(args).items() if k != "model_dir"}
    atomic_write_json(
        args.results / "report.json",
        {"options": options, "torch_threads": torch.get_num_threads(), "seconds": total, "toys": results},
    )
    atomic_write_text(args.results / "heads.md", "\n".join(heads_markdown(r) for r in results))
    atomic_write_text(args.results / "circuit.md", "\n".join(circuit_markdown(r) for r in results))
    print((args.results / "heads.md").read_text())
    print((args.results / "circuit.md").read_text())
    print(f"total {total:.0f} s")


if __name__ == "__main__":
    main()
