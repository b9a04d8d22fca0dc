"""Circuit discovery: which attention heads a task uses.

Steps are separate and take plain tensors, so a study can swap any of them:

    from sae.analysis import circuits as C
    task = C.tasks.ioi(tokenizer, 200)                                      # or C.tasks.from_pairs(...)
    pos = C.collect_head_results(model, task.clean_tokens)                 # [prompts, layers, heads, d_model]
    neg = C.collect_head_results(model, task.corrupted_tokens)
    rows, _ = C.training_rows(torch.cat([pos, neg]), n_prompts=10, seed=0)
    sae_model = C.train_oneill_relu_sae(rows)                               # or C.train_codebook_sae(rows)
    scores = C.oneill_head_scores(C.argmax_codes(sae_model, pos).codes,
                                  C.argmax_codes(sae_model, neg).codes, d_sae=200)   # [layers, heads]
    truth = C.ground_truth.head_mask("gpt2-small/ioi/acdc", 12, 12)         # or from exhaustive patching:
    #   run = C.exhaustive_head_patching(model, task, "resample")
    #   truth = C.ground_truth_from_effects(run.details["effects"], clean_metric, corrupted_metric)
    C.evaluate(scores, truth)                                               # AUC, P/R/F1, controls

`C.run_method(name, model, task, seed)` runs any named method (CODE_METHODS, BASELINES) with its cost.
"""

from . import ground_truth, tasks
from .activations import ForwardCounter, collect_head_results, collect_z, head_results_from_z
from .codes import argmax_codes, topk_code_sets, train_codebook_sae, train_oneill_relu_sae, training_rows
from .evaluation import evaluate, oracle_best_f1, precision_recall_f1, roc_auc
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
from .tasks import Task

__all__ = [
    "ALL_METHODS",
    "BASELINES",
    "CODE_METHODS",
    "CodeMethod",
    "ForwardCounter",
    "MethodScores",
    "Task",
    "argmax_codes",
    "attribution_patching",
    "circuit_faithfulness",
    "collect_head_results",
    "collect_z",
    "eap_ig_nodes",
    "evaluate",
    "exhaustive_head_patching",
    "ground_truth",
    "ground_truth_from_effects",
    "head_results_from_z",
    "oneill_edge_head_scores",
    "oneill_head_scores",
    "oracle_best_f1",
    "overlap_head_scores",
    "precision_recall_f1",
    "roc_auc",
    "run_method",
    "tasks",
    "topk_code_sets",
    "train_codebook_sae",
    "train_oneill_relu_sae",
    "training_rows",
]
