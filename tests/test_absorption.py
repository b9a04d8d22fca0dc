"""Feature absorption finds what was planted: words whose first-letter direction a word-specific latent
carries (with the letter latent silent or weakened), in a hand-built dictionary over synthetic words."""

import math

import pytest
import torch

from sae.analysis.absorption import LETTERS, FirstLetterData, absorption, single_token_words

D, N_LETTERS, WORDS_PER_LETTER, LETTER_SCALE = 96, 5, 200, 3.0


def planted(absorbed_share: float, letter_strength: float = 0.0, seed: int = 0):
    """Words x = 3 p_letter + w_word, and a dictionary of letter latents (decoder p_letter) plus one latent
    per absorbed word (decoder along 3 p_letter + w_word). On an absorbed word the letter latent fires at
    `letter_strength` of its value and the word latent carries the rest of x; elsewhere the letter latent
    and a word latent of w_word alone reconstruct x. -> (data, encode, decoder, absorbed [n] bool)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
    letter_dirs = basis[:N_LETTERS]  # orthonormal, and orthogonal to the word directions' main part
    n = N_LETTERS * WORDS_PER_LETTER
    words = torch.randn(n, D - N_LETTERS, generator=g) @ basis[N_LETTERS:] / math.sqrt(D - N_LETTERS)
    letters = torch.arange(N_LETTERS).repeat_interleave(WORDS_PER_LETTER)
    acts = LETTER_SCALE * letter_dirs[letters] + words
    absorbed = torch.rand(n, generator=g) < absorbed_share

    # latents: [letter latents | one per word]; a word latent's row is w (not absorbed) or x's remainder
    remainder = acts - letter_strength * LETTER_SCALE * letter_dirs[letters]
    word_rows = torch.where(absorbed[:, None], remainder, words)
    decoder = torch.cat([letter_dirs, word_rows / word_rows.norm(dim=-1, keepdim=True)])
    codes = torch.zeros(n, N_LETTERS + n)
    codes[torch.arange(n), letters] = torch.where(absorbed, letter_strength, 1.0) * LETTER_SCALE
    codes[torch.arange(n), N_LETTERS + torch.arange(n)] = word_rows.norm(dim=-1)
    assert torch.allclose(codes @ decoder, acts, atol=1e-4)

    def encode(x: torch.Tensor) -> torch.Tensor:  # the planted code of the nearest word
        return codes[torch.cdist(x, acts).argmin(-1)]

    data = FirstLetterData(acts, letters, [f"w{i}" for i in range(n)], prompt="")
    return data, encode, decoder, absorbed


def test_planted_full_absorption_is_found():
    data, encode, decoder, absorbed = planted(absorbed_share=0.3)
    result = absorption(data, encode, decoder, bootstrap=200)
    truth = absorbed.float().mean().item()
    assert result.probe_accuracy > 0.95
    assert [letter.main_latents for letter in result.letters] == [[i] for i in range(N_LETTERS)]
    assert result.mean_absorption_fraction == pytest.approx(truth, abs=0.12)
    assert result.full_absorption_rate == pytest.approx(truth, abs=0.12)
    assert result.fraction_ci95[0] <= result.mean_absorption_fraction <= result.fraction_ci95[1]
    assert set(result.skipped) == set(LETTERS[N_LETTERS:])  # letters without words say why


def test_partial_absorption_counts_in_the_fraction_only():
    data, encode, decoder, absorbed = planted(absorbed_share=0.5, letter_strength=0.4)
    result = absorption(data, encode, decoder, bootstrap=200)
    # on an absorbed word the letter latent still supplies 0.4 of x·p̂ and the word latent the other 0.6
    expected = 0.6 * absorbed.float().mean().item()
    assert result.mean_absorption_fraction == pytest.approx(expected, abs=0.1)
    assert result.full_absorption_rate == 0.0  # the letter latent fires: never full absorption


def test_no_absorption_scores_zero():
    data, encode, decoder, _ = planted(absorbed_share=0.0)
    with torch.no_grad():  # as a caller encoding without gradients would: the probes still fit
        result = absorption(data, encode, decoder, bootstrap=50)
    assert result.mean_absorption_fraction == 0.0 and result.full_absorption_rate == 0.0
    assert result.fraction_ci95 == (0.0, 0.0)


def test_wrong_decoder_width_is_named():
    data, encode, decoder, _ = planted(absorbed_share=0.0)
    with pytest.raises(ValueError, match="decoder rows have 95 dimensions, the activations 96"):
        absorption(data, encode, decoder[:, :-1])


class _Vocabulary:
    pieces = ("<bos>", "▁cat", "▁Sun", "cat", "▁a", "▁x1", "Ġdog", "▁naïve", "")

    def __len__(self) -> int:
        return len(self.pieces)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.pieces[i] for i in ids]


def test_single_token_words_are_whole_ascii_words_after_a_word_start():
    assert single_token_words(_Vocabulary()) == {1: "cat", 2: "Sun", 6: "dog"}


@pytest.mark.slow
def test_gemma_has_single_token_words_for_every_letter():
    from collections import Counter

    from transformers import AutoTokenizer

    from sae.lm import offline_gemma_dir

    words = single_token_words(AutoTokenizer.from_pretrained(offline_gemma_dir()))
    per_letter = Counter(word[0].lower() for word in words.values())
    assert set(per_letter) == set(LETTERS) and min(per_letter.values()) >= 100  # x: 147 of 86,453


@pytest.mark.slow
def test_first_letter_probe_on_gemma_reads_the_word():
    """On Gemma 3 270M's residual stream, the first-letter probe is far above chance (1/26): the prompts
    put the word where the activation is read."""
    import sae
    from sae.analysis.absorption import first_letter_data
    from sae.lm import load_model

    model = load_model("gemma-3-270m")
    data = first_letter_data(model, "blocks.6.hook_resid_post", words_per_letter=30)
    assert data.acts.shape == (26 * 30, 640) and data.prompt.count("has the first letter:") == 4
    assert all(
        word in model.tokenizer.convert_ids_to_tokens(model.tokenizer(" " + word)["input_ids"])[-1]
        for word in data.words[:20]
    )
    cfg = sae.SAEConfig(architecture="topk", d_in=640, d_sae=256, k=8)
    random_sae = sae.SparseAutoencoder.from_config(cfg, seed=0)
    result = absorption(data, random_sae.encode, random_sae.W_dec, min_words=20, bootstrap=20)
    assert result.probe_accuracy > 0.2 and len(result.letters) == 26
