"""Attributions: the estimated importance `attr_c(x)` of component c on input x, shape `(*lead, C)`.

- `gradient` (the paper's): `sum_o ( sum_l sum_j (d f_o / d h_{l,j})(x) (x_l P_{c,l})_j )^2`, with the
  derivatives taken on the target model (h_l: site l's output before bias, x_l: site l's input in the
  target's forward pass). One VJP per output dimension o, vectorised with `vmap`. With a sequence
  axis in `*lead`, the cotangent e_o is put on every position at once, so position t's gradient is
  `sum_t' d f_{t',o} / d h_{l,t}` (exact per example for pure batch axes).
- `activation`: `sum_l ||x_l P_{c,l}||^2` (one forward pass).
- `ablation`: `mean_o (f(x) - f(x | component c removed))_o^2` with f the full APD model (C extra
  forward passes, under `vmap`).

The component activations `x_l P_{c,l}` depend on the APD parameters, the target's derivatives do
not: gradient attributions are differentiable in the parameters (used by the L_p minimality term);
top-k selection stops their gradient (spdjax.apd.topk).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from spdjax.apd.components import APDParams, component_acts, site_components
from spdjax.apd.forward import masked_forward
from spdjax.sites import lead_shape
from spdjax.targets.base import Target

ATTRIBUTIONS = ("gradient", "activation", "ablation")


def output_site_grads(target: Target, batch: Any) -> dict[str, Array]:
    """`{site: (d_out_model, *lead, d_out_site)}`: d f_o / d h_l for every output dimension o.

    A zero probe is added to every site's output in the target's forward pass; one VJP of the output
    per dimension o (cotangent e_o at every leading position), vmapped over o. Gradients stopped.
    """
    def site_outputs(batch):
        outs = {}

        def record(spec, a, kernel, bias, layer_call):
            outs[spec.name] = layer_call(a)
            return outs[spec.name]

        target.run(batch, record)
        return outs

    shapes = jax.eval_shape(site_outputs, batch)
    zeros = {n: jnp.zeros(sd.shape, sd.dtype) for n, sd in shapes.items()}

    def f(probes):
        def handler(spec, a, kernel, bias, layer_call):
            return layer_call(a) + probes[spec.name]

        return target.run(batch, handler)

    out, vjp = jax.vjp(f, zeros)
    d = out.shape[-1]
    eye = jnp.eye(d, dtype=out.dtype).reshape(d, *([1] * (out.ndim - 1)), d)
    cts = jnp.broadcast_to(eye, (d, *out.shape))
    grads = jax.vmap(lambda ct: vjp(ct)[0])(cts)
    flat = {}
    for s in target.sites:
        g = grads[s.name]
        flat[s.name] = g.reshape(*g.shape[: g.ndim - len(s.out_shape)], s.d_out)
    return jax.lax.stop_gradient(flat)


def all_component_acts(params: APDParams, target: Target, inputs: dict[str, Array]) -> dict[str, Array]:
    """`{site: (*lead, C, d_out_site)}`: `x_l P_{c,l}` on the target's site inputs."""
    return {s.name: component_acts(s, inputs[s.name], site_components(params, s)) for s in target.sites}


def gradient_attributions(
    params: APDParams, target: Target, batch: Any, inputs: dict[str, Array]
) -> Float[Array, "*lead C"]:
    grads = output_site_grads(target, batch)
    acts = all_component_acts(params, target, inputs)
    per_o = 0.0  # (*lead, C, d_out_model); this layout runs ~2x faster on XLA:CPU than o-leading
    for s in target.sites:
        per_o = per_o + jnp.einsum("...cj,o...j->...co", acts[s.name], grads[s.name])
    return jnp.sum(per_o**2, axis=-1)


def activation_attributions(params: APDParams, target: Target, inputs: dict[str, Array]) -> Float[Array, "*lead C"]:
    acts = all_component_acts(params, target, inputs)
    return sum(jnp.sum(a**2, axis=-1) for a in acts.values())


def ablation_attributions(params: APDParams, target: Target, batch: Any, lead: tuple[int, ...]) -> Float[Array, "*lead C"]:
    C = params.C
    full = masked_forward(params, target, batch, None)

    def without(c):
        mask = jnp.broadcast_to(1.0 - jax.nn.one_hot(c, C, dtype=full.dtype), (*lead, C))
        return jnp.mean((full - masked_forward(params, target, batch, mask)) ** 2, axis=-1)

    per_c = jax.lax.map(without, jnp.arange(C)) if C > 64 else jax.vmap(without)(jnp.arange(C))
    return jnp.moveaxis(per_c, 0, -1)


def attributions(
    kind: str, params: APDParams, target: Target, batch: Any, inputs: dict[str, Array]
) -> Float[Array, "*lead C"]:
    """`attr_c(x)` of every component on every leading position, `(*lead, C)`; see the module doc."""
    if kind == "gradient":
        return gradient_attributions(params, target, batch, inputs)
    if kind == "activation":
        return activation_attributions(params, target, inputs)
    if kind == "ablation":
        s = target.sites[0]
        return ablation_attributions(params, target, batch, lead_shape(s, inputs[s.name]))
    raise ValueError(f"apd.attribution: unknown {kind!r}; allowed: {list(ATTRIBUTIONS)}")
