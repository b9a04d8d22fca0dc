"""RelP's propagation rules as forward hooks: the forward value is unchanged, the backward follows LRP.

Relevance patching (Rezaei Jafari et al. 2025) is attribution patching with the gradient replaced by
layer-wise relevance propagation coefficients. Each rule rewrites one operation y = op(x) as

    y' = y.detach() + s(x) - s(x).detach()

with s a surrogate that is linear in x with detached coefficients, so y' = y in value and ∂y'/∂x = ∂s/∂x:

* norms (LN rule): the denominator is a constant, `hook_scale` is returned detached. LayerNorm's
  centring stays in the graph; RMSNorm has none.
* attention (AH rule): the attention weights are constants, `hook_pattern` is returned detached.
* MLP non-linearity (identity rule): a(g) passes relevance as if it were linear, s = g · (a(g) / g).
* gated MLPs, h = a(g) · u (GeGLU, SwiGLU; half rule): half of the product's relevance goes to each factor,
  s = ½ g · (h / g) + ½ u · (h / u); with the identity rule for a inside it.

With these rules the gradient × input of a bias-free block sums to its output (conservation), which plain
gradients do not give through a norm, a softmax or a gate. The MLP rules act on the bridge's canonical
hooks: `mlp.in.hook_out` (the pre-activation, or the linear "up" branch of a gated MLP),
`mlp.gate.hook_out` (the gate) and `mlp.out.hook_in` (what the down projection reads).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor

HookFn = Callable[[Tensor, object], Tensor | None]


def _ratio(y: Tensor, x: Tensor) -> Tensor:
    """y / x elementwise, 0 where x is 0, detached: the coefficient of a linear surrogate."""
    y, x = y.detach(), x.detach()
    return (y / x.masked_fill(x == 0, 1)).masked_fill(x == 0, 0)


def _with_gradient_of(value: Tensor, surrogate: Tensor) -> Tensor:
    """`value` in the forward, `surrogate`'s gradient in the backward."""
    return value.detach() + (surrogate - surrogate.detach())


def identity_rule(h: Tensor, pre: Tensor) -> Tensor:
    """h = a(pre) [..., d_mlp] with the gradient of the linear map pre -> (a(pre)/pre) · pre."""
    return _with_gradient_of(h, pre * _ratio(h, pre))


def half_rule(h: Tensor, gate: Tensor, up: Tensor) -> Tensor:
    """h = a(gate) · up [..., d_mlp] with half of its relevance to each factor (identity rule for a)."""
    return _with_gradient_of(h, 0.5 * (gate * _ratio(h, gate) + up * _ratio(h, up)))


def detached(tensor: Tensor, hook) -> Tensor:
    return tensor.detach()


def relp_hooks(model) -> list[tuple[str, HookFn]]:
    """The forward hooks that make backward passes through `model` follow RelP's rules (fresh state per
    call: use one list for one forward)."""
    names = model.hook_dict
    hooks: list[tuple[str, HookFn]] = [
        (n, detached) for n in names if n.endswith(("hook_scale", "hook_pattern"))
    ]
    for layer in range(model.cfg.n_layers):
        mlp = f"blocks.{layer}.mlp"
        if f"{mlp}.out.hook_in" not in names:
            raise ValueError(
                f"RelP's MLP rules need the hook {mlp}.out.hook_in (the down projection's input); this "
                f"model's block {layer} has none"
            )
        hooks += _mlp_rule_hooks(mlp, gated=f"{mlp}.gate.hook_out" in names)
    return hooks


def _mlp_rule_hooks(mlp: str, gated: bool) -> list[tuple[str, HookFn]]:
    branches: dict[str, Tensor] = {}

    def keep(name: str) -> HookFn:
        def hook(tensor: Tensor, hook) -> None:
            branches[name] = tensor

        return hook

    def rule(h: Tensor, hook) -> Tensor:
        if gated:
            return half_rule(h, branches.pop("gate"), branches.pop("in"))
        return identity_rule(h, branches.pop("in"))

    hooks = [(f"{mlp}.in.hook_out", keep("in")), (f"{mlp}.out.hook_in", rule)]
    if gated:
        hooks.insert(0, (f"{mlp}.gate.hook_out", keep("gate")))
    return hooks


@contextmanager
def quiet_norm_edits() -> Iterator[None]:
    """The bridge warns when a hook edits a norm's scale (it then recomputes the norm in Python, which
    differs from the fused kernel at rounding scale); a detached scale is that edit, on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="A forward hook edited hook_scale")
        yield
