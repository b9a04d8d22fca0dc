"""Evaluate an SAE with the model in the loop, on held-out tokens.

Three forwards per batch: clean; with the SAE's reconstruction spliced in at its hookpoint; and with
the hookpoint zero-ablated. From them: CE loss of each, CE loss recovered
(CE_zero - CE_sae) / (CE_zero - CE_clean), delta LM loss (CE_sae - CE_clean) and KL(clean || spliced)
of the next-token distributions; from the clean activations: FVU, L0 and the latent densities
(dead: never fired on these tokens; dense: fired on more than `dense_threshold` of them).

AFA (Lee et al. 2025): with quasi-orthogonal decoder rows, the approximate feature activation
√Σ_i (f_i ‖d_i‖)² matches the norm of what the latents write, ‖t‖ with t the target less b_dec (and
less the skip path; in normalised units for input-norm SAEs). `afa_ratio` is the mean of AFA / ‖t‖ over
tokens (1: the active rows behave as orthogonal; above 1: they cancel; below: they add up),
`afa_error` the mean of |AFA − ‖t‖| / ‖t‖. Tokens with t = 0 are left out of both.

A transcoder reads its input site and its prediction replaces its output site (the MLP's output, say):
FVU is of the output site, and the zero-ablation zeroes that site (the MLP removed).

With `exclude_bos` (default, as in training) the BOS position is neither spliced nor ablated nor
counted: the SAE never saw it (its residual norm in Gemma is ~5e4).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sae.io import atomic_write_bytes, atomic_write_json
from sae.lm import hookpoints_ready
from sae.sites import output_hookpoint, read_site, write_output


@dataclass
class EvalResult:
    tokens: int
    ce_loss_clean: float
    ce_loss_spliced: float
    ce_loss_zero_ablation: float
    ce_loss_recovered: float
    delta_lm_loss: float
    kl_clean_spliced: float
    fvu: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    afa_ratio: float
    afa_error: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class _Totals:
    """Running sums over evaluated tokens (float64: millions of tokens)."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device):
        self.tokens = self.predictions = 0
        self.ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
        self.kl = self.l0 = self.squared_error = 0.0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.sum_x2 = 0.0
        self.fires = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.afa_ratio = self.afa_error = 0.0
        self.afa_tokens = 0

    def fvu(self) -> float:
        """Squared error over total variance (variance around the mean activation of these tokens)."""
        variance = self.sum_x2 - (self.sum_x**2).sum().item() / self.tokens
        return self.squared_error / variance


def _predictions(logits: torch.Tensor, first: int) -> torch.Tensor:
    """[b, t, vocab] -> float32 [b * (t - first - 1), vocab]: the logits predicting tokens first+1 .. t-1."""
    return logits[:, first:-1].flatten(0, 1).float()


def _next_token_log_probs(logits: torch.Tensor, first: int) -> torch.Tensor:
    return F.log_softmax(_predictions(logits, first), dim=-1)


def evaluate(
    model,
    sae,
    token_batches: Iterable[torch.Tensor],
    exclude_bos: bool = True,
    dense_threshold: float = 0.1,
    out_dir: str | Path | None = None,
    progress: bool = True,
    total_batches: int | None = None,
) -> EvalResult:
    """Evaluate `sae` (at `sae.cfg.hookpoint`; a transcoder from there to `sae.cfg.output_hookpoint`) in
    `model` on `token_batches` [batch, seq] of held-out tokens.

    With `out_dir`, writes eval.json and feature_density.png there.
    """
    hookpoint, written = sae.cfg.hookpoint, output_hookpoint(sae)
    first = 1 if exclude_bos else 0
    device = next(sae.parameters()).device
    totals = _Totals(sae.cfg.d_out, sae.cfg.d_sae, device)
    batches = tqdm(
        token_batches,
        desc="eval (clean, spliced, ablated)",
        unit="batch",
        total=total_batches,
        disable=not progress,
    )
    with hookpoints_ready(model, list(dict.fromkeys([hookpoint, written]))), torch.inference_mode():
        for tokens in batches:
            _add_batch(totals, model, sae, tokens, first)

    if totals.tokens == 0:
        raise ValueError("evaluate: no tokens were given")
    n = totals.predictions
    ce_clean, ce_spliced, ce_zero = (totals.ce[k] / n for k in ("clean", "spliced", "zero"))
    density = (totals.fires / totals.tokens).cpu()
    result = EvalResult(
        tokens=totals.tokens,
        ce_loss_clean=ce_clean,
        ce_loss_spliced=ce_spliced,
        ce_loss_zero_ablation=ce_zero,
        ce_loss_recovered=(ce_zero - ce_spliced) / (ce_zero - ce_clean),
        delta_lm_loss=ce_spliced - ce_clean,
        kl_clean_spliced=totals.kl / n,
        fvu=totals.fvu(),
        l0=totals.l0 / totals.tokens,
        dead_fraction=(density == 0).double().mean().item(),
        dense_fraction=(density > dense_threshold).double().mean().item(),
        afa_ratio=totals.afa_ratio / totals.afa_tokens if totals.afa_tokens else float("nan"),
        afa_error=totals.afa_error / totals.afa_tokens if totals.afa_tokens else float("nan"),
    )
    if out_dir is not None:
        out_dir = Path(out_dir)
        where = {"hookpoint": hookpoint} | ({"output_hookpoint": written} if sae.cfg.transcoder else {})
        atomic_write_json(out_dir / "eval.json", {**result.to_dict(), **where, "exclude_bos": exclude_bos})
        save_density_histogram(
            density, out_dir / "feature_density.png", title=f"{hookpoint}, {totals.tokens} tokens"
        )
    return result


def _add_batch(totals: _Totals, model, sae, tokens: torch.Tensor, first: int) -> None:
    """Add one batch [b, t] to `totals`: clean, spliced and zero-ablated forwards, and the SAE's
    reconstruction of its activations (positions before `first` are left unspliced)."""
    hookpoint, written = sae.cfg.hookpoint, output_hookpoint(sae)
    device = next(sae.parameters()).device
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str):
        return lambda acts, hook: captured.__setitem__(name, acts)

    clean_logits = model.run_with_hooks(
        tokens, fwd_hooks=[(h, keep(h)) for h in dict.fromkeys([hookpoint, written])]
    )
    x = read_site(sae, captured[hookpoint])[:, first:].float().to(device)  # [b, t', d_in]
    # [b, t, d_out]: what the SAE's output replaces (its input itself, for an SAE)
    target = (
        captured[written].float().to(device) if sae.cfg.transcoder else read_site(sae, captured[hookpoint])
    )
    f = sae.encode(x)  # [b, t', d_sae]
    y_hat = sae(x)  # forward, not decode(f): it also undoes input norms and adds skip paths
    # [b, t, d_out]: the reconstruction after the (unspliced) first positions
    padded = torch.cat([target[:, :first].float().to(device), y_hat], dim=1)

    def splice(new: torch.Tensor):
        return lambda a, hook: write_output(sae, a, new.to(a.device), first)

    spliced_logits = model.run_with_hooks(tokens, fwd_hooks=[(written, splice(padded))])
    zero_logits = model.run_with_hooks(tokens, fwd_hooks=[(written, splice(torch.zeros_like(padded)))])

    targets = tokens[:, first + 1 :].flatten().to(clean_logits.device)  # [b * (t - first - 1)]
    clean_lp = _next_token_log_probs(clean_logits, first)
    spliced_lp = _next_token_log_probs(spliced_logits, first)
    totals.ce["clean"] += F.nll_loss(clean_lp, targets, reduction="sum").item()
    totals.ce["spliced"] += F.nll_loss(spliced_lp, targets, reduction="sum").item()
    totals.ce["zero"] += F.cross_entropy(_predictions(zero_logits, first), targets, reduction="sum").item()
    totals.kl += F.kl_div(spliced_lp, clean_lp, log_target=True, reduction="sum").item()
    totals.predictions += len(targets)

    y = target[:, first:].to(device).flatten(0, 1).double()
    f, y_hat = f.flatten(0, 1), y_hat.flatten(0, 1).double()
    totals.tokens += len(y)
    totals.squared_error += ((y - y_hat) ** 2).sum().item()
    totals.sum_x += y.sum(0)
    totals.sum_x2 += (y**2).sum().item()
    fired = f != 0
    totals.l0 += fired.sum().item()
    totals.fires += fired.sum(0)
    afa, written = (
        approximate_feature_activation(sae, f),
        decoder_target(sae, x, target[:, first:]).norm(dim=-1),
    )
    afa, written = afa.flatten().double(), written.flatten().double()
    some = written > 0
    ratio = afa[some] / written[some]
    totals.afa_ratio += ratio.sum().item()
    totals.afa_error += (ratio - 1).abs().sum().item()
    totals.afa_tokens += int(some.sum())


def approximate_feature_activation(sae, f: torch.Tensor) -> torch.Tensor:
    """f [..., d_sae] -> AFA [...]: √Σ_i (f_i ‖d_i‖)², what ‖Σ_i f_i d_i‖ would be with orthogonal rows."""
    return (f.float() * sae.W_dec.float().norm(dim=-1)).pow(2).sum(-1).sqrt()


def decoder_target(sae, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """What the latents have to write, in decoder units: target [..., d_out] (x itself for SAEs) less the
    skip path and b_dec, normalised as the input is for input-norm SAEs. x [..., d_in]."""
    t = target.float()
    if sae.cfg.skip_connection:
        t = t - x.float() @ sae.W_skip.float().T
    stats = sae.input_stats(x.float())
    if stats is not None:
        t = (t - stats.mean) / stats.std
    return t - sae.b_dec.float()


def save_density_histogram(density: torch.Tensor, path: str | Path, title: str = "") -> None:
    """PNG histogram of log10(firing frequency) per latent; dead latents counted in the legend."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    alive = density[density > 0]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    if len(alive):
        axes.hist(torch.log10(alive).numpy(), bins=60, color="#3a6ea5")
    axes.set_xlabel("log10(firing frequency)")
    axes.set_ylabel("latents")
    axes.set_title(f"Feature density: {title}", fontsize=9)
    dead = len(density) - len(alive)
    axes.legend(
        [f"{len(alive)} fired, {dead} never fired on these tokens ({dead / len(density):.1%})"],
        loc="upper left",
        fontsize=8,
    )
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def format_report(result: EvalResult) -> str:
    """The eval figures as an aligned text table."""
    rows = [
        ("held-out tokens", f"{result.tokens}"),
        ("CE loss clean", f"{result.ce_loss_clean:.4f}"),
        ("CE loss with SAE", f"{result.ce_loss_spliced:.4f}"),
        ("CE loss zero-ablated", f"{result.ce_loss_zero_ablation:.4f}"),
        ("CE loss recovered", f"{result.ce_loss_recovered:.2%}"),
        ("delta LM loss", f"{result.delta_lm_loss:+.4f}"),
        ("KL(clean || SAE)", f"{result.kl_clean_spliced:.4f}"),
        ("FVU", f"{result.fvu:.4f}"),
        ("L0", f"{result.l0:.1f}"),
        ("dead latents", f"{result.dead_fraction:.2%}"),
        ("dense latents", f"{result.dense_fraction:.2%}"),
        ("AFA / norm written (1 = orthogonal)", f"{result.afa_ratio:.3f}"),
        ("AFA relative error", f"{result.afa_error:.3f}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)
