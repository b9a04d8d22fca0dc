"""Sparse probing: Python token classes from `tokenize`, and probes that find a planted concept."""

import torch

import sae
from sae.analysis.probing import python_character_classes, python_token_classes, sparse_probing

SOURCE = '''def area(r):
    """Circle area."""
    return 3.14 * r ** 2 + len('ab')  # approx
'''


def classes_of(source: str) -> dict[str, str | None]:
    classes = python_character_classes(source)
    words = ["def", "area", '"""Circle area."""', "return", "3.14", "*", "len", "'ab'", "# approx"]
    return {w: classes[source.index(w)] for w in words}


def test_python_character_classes():
    assert classes_of(SOURCE) == {
        "def": "keyword",
        "area": "identifier",
        '"""Circle area."""': "docstring",
        "return": "keyword",
        "3.14": "number",
        "*": "operator",
        "len": "builtin",
        "'ab'": "string",
        "# approx": "comment",
    }
    assert python_character_classes("x = (\n") == [c for c in python_character_classes("x = (\n")]  # no raise


def test_python_token_classes_label_model_tokens_by_offsets(tiny_lm):
    """Each model token takes the class of its first non-space character (GPT-2's tokens here: 'de', 'f')."""
    ids, labels = python_token_classes(SOURCE, tiny_lm.tokenizer)
    offsets = tiny_lm.tokenizer(SOURCE, return_offsets_mapping=True, add_special_tokens=False)[
        "offset_mapping"
    ]
    assert len(ids) == len(offsets) and sum(mask.long() for mask in labels.values()).max() == 1
    for word, kind in classes_of(SOURCE).items():
        at = SOURCE.index(word)
        covering = next(i for i, (a, b) in enumerate(offsets) if a <= at < b)
        assert labels[kind][covering], (word, kind)


def test_probing_finds_the_planted_concept_in_the_latents_not_in_the_dimensions():
    """x = codes @ features (256 features in d = 256, ~5 active). An SAE whose latents are the codes
    (encoder = decoder = features, a small bias against interference) has one latent per concept; a raw
    dimension mixes all 256 features. Measured: latents k = 1 0.973-0.985, dimensions k = 1 0.72-0.83, k = 5
    0.88-0.90."""
    g = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(256, 256, generator=g), dim=1)
    on = torch.rand(60_000, 256, generator=g) < 5 / 256
    codes = on * (0.5 + torch.rand(60_000, 256, generator=g))
    x = codes @ features
    cfg = sae.SAEConfig(architecture="relu", d_in=256, d_sae=256)
    oracle = sae.SparseAutoencoder(cfg)
    with torch.no_grad():
        oracle.W_enc.copy_(features)
        oracle.W_dec.copy_(features)
        oracle.b_enc.fill_(-0.25)
    concepts = {f"feature {j}": on[:, j] for j in (3, 77, 200)}
    results, skipped = sparse_probing(x, concepts, oracle.encode, ks=(1, 5), per_class=1000)
    assert skipped == {}
    accuracy = {(r.concept, r.basis, r.k): r for r in results}
    for j in (3, 77, 200):
        top1 = accuracy[(f"feature {j}", "latents", 1)]
        assert top1.chosen == [j] and top1.accuracy > 0.9 and top1.ci95[0] > 0.85
        assert accuracy[(f"feature {j}", "dimensions", 1)].accuracy < top1.accuracy - 0.1
        assert accuracy[(f"feature {j}", "dimensions", 5)].accuracy < top1.accuracy - 0.05


def test_too_few_positives_are_reported_not_scored():
    x = torch.randn(500, 8)
    labels = {"rare": torch.zeros(500, dtype=torch.bool)}
    labels["rare"][:3] = True
    cfg = sae.SAEConfig(architecture="relu", d_in=8, d_sae=16)
    results, skipped = sparse_probing(x, labels, sae.SparseAutoencoder.from_config(cfg, seed=0).encode)
    assert results == [] and skipped == {"rare": "3 positive and 497 negative tokens"}
