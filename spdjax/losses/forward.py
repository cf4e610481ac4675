"""The forward passes the loss terms are made of: the clean pass, the CI function and masked passes.

Shapes: a batch has leading axes `*lead` (batch, positions, ...); CI and masks are `(*lead, C)` per site;
S-stacked masks carry a leading `S` axis. `remat=True` wraps a pass in `jax.checkpoint` (its activations are
recomputed in the backward pass instead of stored): same values and gradients, less memory.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from spdjax import lowrank
from spdjax.ci import ci_raw
from spdjax.components import masked_site_output, site_components
from spdjax.decomposition import SPDParams
from spdjax.lowrank import LowRankSum, dense
from spdjax.masks import SiteMask
from spdjax.sigmoids import get_sigmoids
from spdjax.sites import inner_acts
from spdjax.targets.base import Target

DIVERGENCES = ("mse", "kl")
LOSS_MASK = "loss_mask"  # key of a per-position weight in a dict batch (sequence models)

_POSITION_WEIGHT: contextvars.ContextVar[Array | None] = contextvars.ContextVar("spdjax_position_weight", default=None)
_VOCAB_CHUNK: contextvars.ContextVar[int | None] = contextvars.ContextVar("spdjax_vocab_chunk", default=None)
# None: off; else {(earlier site, later site): (V of the later, clean input of the earlier @ that V)}
_LOW_RANK: contextvars.ContextVar[dict[tuple[str, str], tuple[Array, Array]] | None] = contextvars.ContextVar(
    "spdjax_low_rank_outputs", default=None
)
_CLEAN_INNER: contextvars.ContextVar[dict[str, tuple[Array, Array]] | None] = contextvars.ContextVar(
    "spdjax_clean_inner", default=None
)


@contextlib.contextmanager
def position_weights(weight: Array | None) -> Iterator[None]:
    """Inside this block (at trace time), `divergence` averages over positions with `weight`
    (`(*lead)`, e.g. `(batch, positions)`: 1 where a position carries a loss, 0 where not)."""
    token = _POSITION_WEIGHT.set(weight)
    try:
        yield
    finally:
        _POSITION_WEIGHT.reset(token)


@contextlib.contextmanager
def vocab_chunks(chunk: int | None) -> Iterator[None]:
    """Inside this block (at trace time), `divergence`'s KL runs over the last axis in chunks of `chunk`
    entries (`kl_chunked`); None: in one piece."""
    token = _VOCAB_CHUNK.set(chunk)
    try:
        yield
    finally:
        _VOCAB_CHUNK.reset(token)


def kl_chunked(pred: Float[Array, "*lead V"], target: Float[Array, "*lead V"], chunk: int) -> Float[Array, "*lead"]:
    """KL(softmax(target) || softmax(pred)) over the last axis, computed `chunk` entries at a time
    (`lax.map` over chunks, each under `jax.checkpoint`): no temporary of the full `(*lead, V)` size
    besides the inputs, in the forward or the backward pass. Uses
    KL = sum_v softmax(t)_v (t_v - p_v) - lse(t) + lse(p)."""
    V = pred.shape[-1]
    n = -(-V // chunk)
    pad = n * chunk - V
    low = jnp.finfo(pred.dtype).min  # padded entries: weight exp(low - lse) = 0 and t - p = 0

    def split(x):
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=low) if pad else x
        return jnp.moveaxis(x.reshape(x.shape[:-1] + (n, chunk)), -2, 0)  # (n, *lead, chunk)

    tc, pc = split(target), split(pred)
    lse = lambda c: jax.scipy.special.logsumexp(jax.lax.map(jax.checkpoint(lambda x: jax.scipy.special.logsumexp(x, -1)), c), 0)  # noqa: E731
    lse_t, lse_p = lse(tc), lse(pc)

    @jax.checkpoint
    def part(tp):
        t, p = tp
        return jnp.sum(jnp.exp(t - lse_t[..., None]) * (t - p), -1)

    return jnp.sum(jax.lax.map(part, (tc, pc)), 0) - lse_t + lse_p


def clean_inner_acts(params: SPDParams, target: Target, inputs: dict[str, Array]) -> dict[str, tuple[Array, Array]]:
    """`{site: (V, h = a V)}` on the clean inputs, for every untied site: the inner activations
    that the CI function and every masked pass whose site input is still clean share (`shared_inner_acts`)."""
    out = {}
    for s in target.sites:
        if s.tied_to is None:
            V = params.components[s.name].V
            out[s.name] = (V, inner_acts(s, inputs[s.name], V))
    return out


@contextlib.contextmanager
def shared_inner_acts(inner: dict[str, tuple[Array, Array]] | None) -> Iterator[None]:
    """Inside this block (at trace time), `masked_forward` takes a site's inner activations from
    `inner` (`clean_inner_acts`) while its input is still clean: no masked site has run before it in
    that pass, and it computes with the very `V` they were made from (same traced value; a pass under
    `jax.checkpoint` or on other parameters recomputes its own).

    The value is the same; the gain is in the backward pass: the cotangents of every pass meet on one
    `h`, so dL/dV = a^T (sum of the passes' dh) is one matmul instead of one per pass (resid_mlp:1:
    three (1000 x 2048) x (2048 x 100) products become one).
    """
    token = _CLEAN_INNER.set(inner)
    try:
        yield
    finally:
        _CLEAN_INNER.reset(token)


def clean_reads(
    params: SPDParams, target: Target, inputs: dict[str, Array]
) -> dict[tuple[str, str], tuple[Array, Array]]:
    """`{(s, t): (V_t, a_s V_t)}` for linear sites s before t of the same input width (t untied): the
    clean input of s read through t's V. Under `low_rank_outputs`, a masked pass in which t's input is
    s's clean input plus low-rank site outputs (a residual stream) takes this product instead of its
    own, so the passes' cotangents meet on one array and dL/dV_t gets one (d_in x batch) x (batch x C)
    product for this part instead of one per pass (resid_mlp2: two of three removed). XLA drops the
    pairs no pass uses."""
    dense = [s for s in target.sites if s.kind == "linear" and len(s.in_shape) == 1]
    out = {}
    for i, s in enumerate(dense):
        for t in dense[i + 1:]:
            if t.tied_to is None and t.d_in == s.d_in:
                V = params.components[t.name].V
                out[(s.name, t.name)] = (V, inputs[s.name] @ V)
    return out


@contextlib.contextmanager
def low_rank_outputs(reads: dict[tuple[str, str], tuple[Array, Array]] | None) -> Iterator[None]:
    """Inside this block (at trace time), `masked_forward`'s linear sites return their outputs as
    `spdjax.lowrank.LowRankSum` where that pays (`loss.low_rank_outputs`): a masked site's of rank C
    (+ d_in with the delta term) and an unmasked widening site's (rank d_in) below d_out. For targets
    whose residual stream only adds site outputs and reads them through matrices (ResidMLP). `reads`:
    `clean_reads` (None: off)."""
    token = _LOW_RANK.set(reads)
    try:
        yield
    finally:
        _LOW_RANK.reset(token)


def batch_position_weight(batch: Any) -> Array | None:
    """`batch["loss_mask"]` of a dict batch, else None (every position counts)."""
    if isinstance(batch, dict) and LOSS_MASK in batch:
        return batch[LOSS_MASK]
    return None


def _maybe_remat(fn, remat: bool):
    return jax.checkpoint(fn) if remat else fn


def divergence(kind: str, pred: Array, target: Array) -> Float[Array, ""]:
    """D(pred, target): `mse` (mean over elements) or `kl` (KL(target || pred) over the last axis,
    averaged over the other axes; inside `vocab_chunks(n)` computed by `kl_chunked`). Inside `position_weights(w)`, the per-position values (`mse`: the
    mean over the last axis) are averaged with the weights `w: (*lead)` instead."""
    if kind not in DIVERGENCES:
        raise ValueError(f"output_loss: unknown divergence {kind!r}; allowed: {list(DIVERGENCES)}")
    w = _POSITION_WEIGHT.get()
    if kind == "mse":
        if w is None:
            return jnp.mean((pred - target) ** 2)
        per = jnp.mean((pred - target) ** 2, axis=-1)
    elif _VOCAB_CHUNK.get() is not None:
        per = kl_chunked(pred, target, _VOCAB_CHUNK.get())
        if w is None:
            return jnp.mean(per)
    else:
        lt = jax.nn.log_softmax(target, axis=-1)
        lp = jax.nn.log_softmax(pred, axis=-1)
        per = jnp.sum(jnp.exp(lt) * (lt - lp), axis=-1)
        if w is None:
            return jnp.mean(per)
    w = jnp.broadcast_to(jnp.asarray(w, per.dtype), per.shape)
    return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1e-12)


def clean_forward(target: Target, batch: Any) -> tuple[Array, dict[str, Array]]:
    """Target output and every site's input in the clean forward pass (gradients stopped)."""
    inputs: dict[str, Array] = {}

    def record(spec, a, kernel, bias, layer_call):
        inputs[spec.name] = a
        return layer_call(a)

    out = target.run(batch, record)
    missing = [n for n in target.site_names if n not in inputs]
    if missing:
        raise ValueError(f"sites {missing} were never called in the target's forward pass")
    return jax.lax.stop_gradient(out), jax.lax.stop_gradient(inputs)


class CIOutputs(NamedTuple):
    raw: dict[str, Array]
    lower: dict[str, Array]  # masks and CI-masked losses
    upper: dict[str, Array]  # importance minimality


def compute_ci(
    params: SPDParams,
    target: Target,
    inputs: dict[str, Array],
    sigmoid: str,
    remat: bool = False,
    inner: dict[str, tuple[Array, Array]] | None = None,
) -> CIOutputs:
    """Raw, lower-leaky and upper-leaky importances `(*lead, C)` for every site (`remat`: per site CI
    function under `jax.checkpoint`; `inner`: `clean_inner_acts`, used by `mlp` CI functions)."""
    sig = get_sigmoids(sigmoid)
    raw = {}
    for s in target.sites:
        comp = site_components(params.components, s)
        if inner is not None and s.name in inner and not remat:
            raw[s.name] = ci_raw(params.ci[s.name], s, inputs[s.name], comp, h=inner[s.name][1])
            continue
        f = _maybe_remat(lambda p, a, comp, s=s: ci_raw(p, s, a, comp), remat)
        raw[s.name] = f(params.ci[s.name], inputs[s.name], comp)
    return CIOutputs(
        raw,
        {n: sig.lower(z) for n, z in raw.items()},
        {n: sig.upper(z) for n, z in raw.items()},
    )


def masked_forward(
    params: SPDParams, target: Target, batch: Any, site_masks: dict[str, SiteMask], remat: bool = False
) -> Array:
    """Target forward with each site in `site_masks` computing its masked factored map; others clean."""

    reads = _LOW_RANK.get()

    def run(params, site_masks):
        inner = _CLEAN_INNER.get()
        masked_before = False
        clean = {}  # id(a) -> (a, site) for the site inputs seen before any masked site

        def read(spec, a, V):
            """a V for a `LowRankSum` a whose base is a clean site input: through `reads`."""
            src = clean.get(id(a.base)) if a.base is not None else None
            if src is None or src[0] is not a.base or (src[1], spec.name) not in reads:
                return None
            V_t, product = reads[(src[1], spec.name)]
            return product + LowRankSum(None, a.terms) @ V if V_t is V else None

        def handler(spec, a, kernel, bias, layer_call):
            nonlocal masked_before
            if not masked_before and not isinstance(a, LowRankSum):
                clean[id(a)] = (a, spec.name)
            if spec.name not in site_masks:
                flat = lowrank.carries(spec)
                if isinstance(a, LowRankSum) and flat:
                    y = a @ kernel  # the target's own map, through a's factors
                    return y if bias is None else y + bias
                if reads is not None and flat and lowrank.pays(spec.d_in, spec.d_out):
                    return LowRankSum(bias, ((a, kernel),))  # a widening map: its output has rank d_in
                return layer_call(dense(a))
            m = site_masks[spec.name]
            comp = site_components(params.components, spec)
            h = None
            if not masked_before and inner is not None and spec.name in inner and inner[spec.name][0] is comp.V:
                h = inner[spec.name][1]
            elif isinstance(a, LowRankSum) and reads is not None:
                h = read(spec, a, comp.V)
            masked_before = True
            return masked_site_output(
                spec, a, comp, m.mask, m.delta, kernel, bias, h=h, low_rank=reads is not None
            )

        return dense(target.run(batch, handler))

    return _maybe_remat(run, remat)(params, site_masks)


def layerwise_forward_losses(
    params: SPDParams,
    target: Target,
    batch: Any,
    out: Array,
    site_masks: dict[str, SiteMask],
    output_loss: str,
    unroll: int | None = None,
    remat: bool = False,
) -> Float[Array, ""]:
    """Mean over sites l of D(forward with only site l masked, out).

    `unroll=None` (default) traces one forward pass per site, each with only that site masked: XLA
    then shares every pass's clean prefix with the clean forward pass and skips the masked branch
    elsewhere (resid_mlp:2 step: 106 -> 46 GFLOP). For many sites pass an int: the sites are swept
    with `lax.scan` (that unroll factor), each handler running `lax.cond(l == its index, masked,
    clean)`, which keeps compile time and code size flat in the number of sites at the price of
    recomputing the clean parts in every iteration.
    """
    names = [s.name for s in target.sites if s.name in site_masks]
    if unroll is None:
        total = 0.0
        for n in names:
            pred = masked_forward(params, target, batch, {n: site_masks[n]}, remat)
            total = total + divergence(output_loss, pred, out)
        return total / len(names)
    index = {n: i for i, n in enumerate(names)}

    def body(total, l):
        def run(params, site_masks):
            def handler(spec, a, kernel, bias, layer_call):
                if spec.name not in index:
                    return layer_call(a)
                m = site_masks[spec.name]
                comp = site_components(params.components, spec)

                def masked(a):
                    return masked_site_output(spec, a, comp, m.mask, m.delta, kernel, bias)

                return jax.lax.cond(l == index[spec.name], masked, layer_call, a)

            return target.run(batch, handler)

        pred = _maybe_remat(run, remat)(params, site_masks)
        return total + divergence(output_loss, pred, out), None

    total, _ = jax.lax.scan(body, jnp.zeros((), out.dtype), jnp.arange(len(names)), unroll=unroll)
    return total / len(names)
