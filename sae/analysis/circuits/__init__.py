"""Circuit discovery: which attention heads (and head -> head edges) a model uses for a task.

O'Neill & Bui 2024's SAE-code method as published, our variants of it, and the usual baselines, behind
one API whose steps take plain tensors, so a study can swap any of them. In order:

    from sae.analysis import circuits as C
    task = C.tasks.ioi(model.tokenizer, 40)           # or C.tasks.build_task(name, model, n), from_pairs
    pos = C.collect_head_results(model, task.clean_tokens)                 # [prompts, layers, heads, d_model]
    neg = C.collect_head_results(model, task.corrupted_tokens)
    rows, _ = C.training_rows(torch.cat([pos, neg]), n_prompts=10, seed=0)
    sae_model = C.train_oneill_relu_sae(rows)                               # or C.train_codebook_sae(rows)
    scores = C.oneill_head_scores(C.argmax_codes(sae_model, pos).codes,
                                  C.argmax_codes(sae_model, neg).codes, d_sae=200)   # [layers, heads]
    truth = C.ground_truth.head_mask("gpt2-small/ioi/acdc", 12, 12)         # or from exhaustive patching:
    #   run = C.exhaustive_head_patching(model, task, "resample")
    #   truth = C.ground_truth_from_effects(run.details["effects"], clean_metric, corrupted_metric)
    C.evaluate(scores, truth)                                     # ROC AUC (overall, within layers), P/R/F1
    C.circuit_faithfulness(model, task, C.evaluation.top_k_mask(scores, int(truth.sum())))

`C.run_method(name, model, task, seed)` runs any named method (CODE_METHODS, BASELINES; or a CodeMethod of
your own) with its cost; `C.controls` runs one on shuffled prompt labels or a re-initialised model, which
should come out near chance (`C.evaluation.near_chance`). The command: `sae-analyze circuits`. Guide:
docs/circuits.md; the study behind the registry: studies/circuits/.

Over trained dictionaries (feature circuits; the command: `sae-analyze feature-circuit`):

    spliced = C.SplicedModel(model, saes)            # splice.py: the model's logits; latents, errors as nodes
    effects = C.integrated_gradients_nodes(spliced, task, 10)  # or attribution_patching_nodes, relp_nodes
    effects.heads("blocks.3.attn.hook_z")            # [heads]: a hook_z SAE's estimates split per head
    nodes = C.ranked_nodes(effects, n=30)            # feature_circuit.py: top-N or by threshold
    C.feature_edges(spliced, task, nodes)            # feature_edges.py: latent -> latent and -> metric
    C.curves(spliced, task, effects, [10, 100])      # faithfulness / completeness vs random latents
    C.raw_basis(hookpoint, d_in)                     # the same procedure on the site's own dimensions
    C.patching_check(spliced, task, [effects])       # estimates against real patching of sampled latents
"""

from . import controls, edges, evaluation, ground_truth, tasks
from .activations import ForwardCounter, collect_head_results, collect_z, head_results_from_z
from .codes import argmax_codes, topk_code_sets, train_codebook_sae, train_oneill_relu_sae, training_rows
from .evaluation import evaluate, oracle_best_f1, precision_recall_f1, roc_auc
from .feature_attribution import (
    NodeEffects,
    attribution_patching_nodes,
    integrated_gradients_nodes,
    patching_check,
    relp_nodes,
)
from .feature_circuit import Node, curves, random_like, ranked_nodes, raw_basis
from .feature_edges import feature_edges
from .methods import ALL_METHODS, BASELINES, CODE_METHODS, CodeMethod, run_method
from .patching import (
    MethodScores,
    attribution_patching,
    circuit_faithfulness,
    eap_ig_nodes,
    exhaustive_head_patching,
    ground_truth_from_effects,
)
from .scoring import oneill_edge_head_scores, oneill_head_scores, overlap_head_scores
from .splice import SiteNodes, SplicedModel
from .tasks import Task

__all__ = [
    "ALL_METHODS",
    "BASELINES",
    "CODE_METHODS",
    "CodeMethod",
    "ForwardCounter",
    "MethodScores",
    "Node",
    "NodeEffects",
    "SiteNodes",
    "SplicedModel",
    "Task",
    "argmax_codes",
    "attribution_patching",
    "attribution_patching_nodes",
    "circuit_faithfulness",
    "collect_head_results",
    "collect_z",
    "controls",
    "curves",
    "eap_ig_nodes",
    "edges",
    "evaluate",
    "evaluation",
    "exhaustive_head_patching",
    "feature_edges",
    "ground_truth",
    "ground_truth_from_effects",
    "head_results_from_z",
    "integrated_gradients_nodes",
    "oneill_edge_head_scores",
    "oneill_head_scores",
    "oracle_best_f1",
    "overlap_head_scores",
    "patching_check",
    "precision_recall_f1",
    "random_like",
    "ranked_nodes",
    "raw_basis",
    "relp_nodes",
    "roc_auc",
    "run_method",
    "tasks",
    "topk_code_sets",
    "train_codebook_sae",
    "train_oneill_relu_sae",
    "training_rows",
]
