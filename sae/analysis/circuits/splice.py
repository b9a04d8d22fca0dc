"""SAEs spliced into a model with their errors kept as nodes (Marks et al. 2024, Sparse Feature Circuits).

At each spliced hookpoint the activation x [b, t, d_in] is rewritten as

    f = encode(x)                 the latents       [b, t, d_sae]
    ε = x - x̂(f)                  the SAE's error   [b, t, d_in]
    x' = x̂(f) + ε                 what the model reads on: x itself, to rounding

so the model's output is unchanged, and the metric becomes a function of every latent and every error.
f and ε are leaves of the autograd graph, independent of each other: after a backward pass `f.grad` is
∂metric/∂x' through the decoder (W_dec f) and `ε.grad` is ∂metric/∂x'. The activation x itself passes
its gradient straight on (x' = x in value, and d x'/d x is taken as the identity), so a node upstream gets
the gradient it has in the unspliced model: downstream sites do not cut it. x̂ includes what
`SparseAutoencoder.forward` adds beside the decoder (the input norm undone with x's statistics, the skip
path), both held at their values on x, so ε is the whole difference.

A transcoder (Dunefsky et al. 2024) reads x at its input site and replaces its output site y (the MLP's
output, say) by ŷ(f) + ε with ε = y - ŷ(f): its latents are computed at the input site and its error is
a node of the output site's width. The real y passes its gradient on, as x does above (the MLP stays
in the graph, in value replaced).

Positions before `first` (BOS by default: SAEs are not trained on it) are left as they are and their
nodes get no gradient. An intervention edits a site's nodes before x' is formed (patching a latent to
its value on other tokens, ablating it); the error keeps its value on these tokens unless it edits that
too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sae.lm import capture, hookpoints_ready
from sae.model import SparseAutoencoder
from sae.sites import output_hookpoint, read_site, write_output, write_site


@dataclass
class SiteNodes:
    """One spliced site's nodes on a batch: latents [b, t, d_sae] and error [b, t, d_out] (d_out = d_in
    for SAEs); `input` is the activation the SAE read [b, t, d_in] (no gradient; what x̂'s input
    statistics and skip path use)."""

    latents: Tensor
    error: Tensor
    input: Tensor | None = None


Intervention = Callable[[SiteNodes], SiteNodes]
"""Edits a site's nodes (values only: the result is spliced in and its gradients kept)."""


class SplicedModel:
    """`model` with one SAE at each of its hookpoints; `run` returns logits and every site's nodes."""

    def __init__(self, model, saes: Sequence[SparseAutoencoder], first: int = 1):
        """One SAE or transcoder per site, keyed by the hookpoint it reads; every hook read or written
        belongs to one dictionary alone."""
        hookpoints = [sae.cfg.hookpoint for sae in saes]
        if any(h is None for h in hookpoints):
            raise ValueError("every spliced SAE needs cfg.hookpoint (the hook it reads)")
        touched = [h for sae in saes for h in dict.fromkeys([sae.cfg.hookpoint, output_hookpoint(sae)])]
        if len(set(touched)) != len(touched):
            raise ValueError(f"one SAE per hookpoint (a transcoder's output site included); given {touched}")
        self.model, self.first = model, first
        self.saes: dict[str, SparseAutoencoder] = dict(zip(hookpoints, saes, strict=True))
        self._hooks_used = touched
        probe = torch.full((1, 1), model.tokenizer.bos_token_id, device=model.cfg.device)
        with hookpoints_ready(model, touched):
            acts = capture(model, probe, touched, stop_at_layer=None)
        for hookpoint, sae in self.saes.items():
            read_site(sae, acts[hookpoint])  # a wrong width is named here, before any real forward
            if sae.cfg.transcoder and acts[output_hookpoint(sae)].shape[-1] != sae.cfg.d_out:
                raise ValueError(
                    f"the transcoder reading {hookpoint} writes d_out={sae.cfg.d_out} but "
                    f"{output_hookpoint(sae)} has width {acts[output_hookpoint(sae)].shape[-1]}"
                )

    @property
    def hookpoints(self) -> list[str]:
        return list(self.saes)

    def run(
        self,
        tokens: Tensor,
        interventions: dict[str, Intervention] | None = None,
        extra_hooks: Sequence[tuple[str, Callable]] = (),
        last_position: bool = False,
    ) -> tuple[Tensor, dict[str, SiteNodes]]:
        """tokens [b, t] -> logits [b, t, vocab] and each site's nodes, which keep their gradients
        (`latents.grad`, `error.grad` after a backward pass from the logits). `extra_hooks` run beside the
        splices (RelP's rules: `lrp.relp_hooks`). `last_position`: logits [b, 1, vocab] of the last
        position only, what task metrics read (the unembedding of a 262k vocabulary is a third of a
        Gemma 3 270M forward over all positions)."""
        logits, nodes, _ = self._run(tokens, interventions or {}, extra_hooks, False, last_position)
        return logits, nodes

    def run_connected(
        self, tokens: Tensor, last_position: bool = False, extra_hooks: Sequence[tuple[str, Callable]] = ()
    ) -> tuple[Tensor, dict[str, SiteNodes], dict[str, SiteNodes]]:
        """For edges: tokens [b, t] -> logits, each site's nodes as leaves, and the same nodes as computed
        from the site's input, in the autograd graph of the nodes of earlier sites.

        Each site's output is rebuilt from its leaves alone (no pass-through), so a gradient from a node
        or the metric stops at the nearest spliced sites below it: ∂(computed nodes of site s)/∂(leaves of
        site u) is the direct effect of u on s with every site in between held at its value.
        `extra_hooks` as in `run` (e.g. `lrp.detached` on the norm scales and attention patterns, which
        circuit-tracer's attribution holds constant)."""
        return self._run(tokens, {}, extra_hooks, True, last_position)

    def _run(
        self,
        tokens: Tensor,
        interventions: dict[str, Intervention],
        extra_hooks: Sequence[tuple[str, Callable]],
        connected: bool,
        last_position: bool,
    ) -> tuple[Tensor, dict[str, SiteNodes], dict[str, SiteNodes]]:
        unknown = set(interventions) - set(self.saes)
        if unknown:
            raise ValueError(
                f"interventions at {sorted(unknown)}, where no SAE is spliced ({self.hookpoints})"
            )
        nodes: dict[str, SiteNodes] = {}
        computed: dict[str, SiteNodes] = {}

        def nodes_at(hookpoint: str, x: Tensor, y: Tensor) -> Tensor:
            """x [b, t, d_in] read, y [b, t, d_out] to replace (x itself for an SAE) -> what replaces y;
            fills nodes (and computed) for the site."""
            sae = self.saes[hookpoint]
            held = x.detach()  # the input-norm statistics and the skip path are held at x's values
            if connected:
                latents = sae.encode(x)
                computed[hookpoint] = SiteNodes(latents, y - reconstruct(sae, latents, x), held)
                site = SiteNodes(
                    latents.detach().requires_grad_(),
                    computed[hookpoint].error.detach().requires_grad_(),
                    held,
                )
                nodes[hookpoint] = site
                return reconstruct(sae, site.latents, held) + site.error
            with torch.no_grad():
                latents = sae.encode(held)
                site = SiteNodes(latents, y.detach() - reconstruct(sae, latents, held), held)
            if hookpoint in interventions:
                edited = interventions[hookpoint](site)
                site = SiteNodes(edited.latents, edited.error, held)
            if torch.is_grad_enabled():
                keep_gradient(site.latents)
                keep_gradient(site.error)
            nodes[hookpoint] = site
            # + (y - y.detach()): zero in value, the identity for y's gradient (the pass-through above)
            return reconstruct(sae, site.latents, held) + site.error + (y - y.detach())

        def splice_at(hookpoint: str) -> Callable[[Tensor, object], Tensor]:
            sae = self.saes[hookpoint]

            def splice(acts: Tensor, hook) -> Tensor:  # hook.name is the bridge's own name, not the alias
                x = read_site(sae, acts).to(sae.W_dec.dtype)  # [b, t, d_in]
                return write_site(sae, acts, nodes_at(hookpoint, x, x), self.first)

            return splice

        def transcoder_at(hookpoint: str) -> list[tuple[str, Callable[[Tensor, object], Tensor | None]]]:
            sae = self.saes[hookpoint]
            read: list[Tensor] = []  # the input of this forward, from the input site to the output site

            def keep_input(acts: Tensor, hook) -> None:
                read.append(read_site(sae, acts).to(sae.W_dec.dtype))

            def splice(acts: Tensor, hook) -> Tensor:
                if not read:
                    raise RuntimeError(
                        f"{sae.cfg.output_hookpoint} ran before {hookpoint}: the transcoder's output site "
                        "must come after its input site"
                    )
                new = nodes_at(hookpoint, read.pop(), acts.to(sae.W_dec.dtype))
                return write_output(sae, acts, new, self.first)

            return [(hookpoint, keep_input), (output_hookpoint(sae), splice)]

        hooks = []
        for h, sae in self.saes.items():
            hooks += transcoder_at(h) if sae.cfg.transcoder else [(h, splice_at(h))]
        hooks += list(extra_hooks)
        if last_position:
            hooks.append(("unembed.hook_in", _last_position))
        with hookpoints_ready(self.model, self._hooks_used), self.model.hooks(fwd_hooks=hooks):
            logits = self.model(tokens.to(self.model.cfg.device))
        return logits, nodes, computed


def _last_position(x: Tensor, hook) -> Tensor:
    return x[:, -1:]


def reconstruct(sae: SparseAutoencoder, latents: Tensor, x: Tensor) -> Tensor:
    """x̂ [b, t, d_out] from latents [b, t, d_sae]: the decoder, then what `forward` adds that depends on
    x (its input-norm statistics, the skip path), as functions of the x given."""
    x_hat = sae.decode(latents, sae.input_stats(x))
    if sae.cfg.skip_connection:
        x_hat = x_hat + x @ sae.W_skip.T
    return x_hat


def keep_gradient(node: Tensor) -> None:
    """Make `node.grad` filled by a backward pass: a leaf starts requiring grad; a tensor an intervention
    computed from something that requires grad keeps its gradient too."""
    if node.requires_grad:
        node.retain_grad()
    else:
        node.requires_grad_()
