"""SPD (Stochastic Parameter Decomposition) as a `spdjax.method.Method`.

Config sections: `ci: {type, hidden}` and `loss` (see `spdjax.losses.loss_config_from`). Before step 0
the components get `optim.faithfulness_warmup_steps` of AdamW on the faithfulness loss alone; the
gradients of the components and of the CI functions are clipped separately (`optim.clip_components`,
`optim.clip_ci`). Parameters are sharded by role over the mesh's `model` axis (`spdjax.sharding`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jaxtyping import Array

from spdjax import export, metrics, sharding
from spdjax.ci import CI_KINDS
from spdjax.components import faithfulness_loss
from spdjax.decomposition import SPDParams, init_decomposition
from spdjax.experiment import Experiment
from spdjax.fields import to_dict
from spdjax.losses import TERMS, LossConfig, loss_config_from, loss_fn
from spdjax.method import Method
from spdjax.optim import OptimConfig, make_optimizer
from spdjax.targets.base import Target


@dataclasses.dataclass(frozen=True)
class SPDSettings:
    ci_type: str = "mlp"
    ci_hidden: tuple[int, ...] = (16,)
    loss: LossConfig = LossConfig()


def ci_settings_from(section) -> tuple[str, tuple[int, ...]]:
    ci = to_dict(section, "ci")
    bad = sorted(set(ci) - {"type", "hidden"})
    if bad:
        raise ValueError(f"config.ci: unknown field(s) {bad}; allowed: ['hidden', 'type']")
    ci_type = ci.get("type", "mlp")
    if ci_type not in CI_KINDS:
        raise ValueError(f"config.ci.type: unknown CI function {ci_type!r}; allowed: {list(CI_KINDS)}")
    hidden = tuple(ci.get("hidden", (16,)))
    if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
        raise ValueError(f"config.ci.hidden must be positive ints, got {hidden!r}")
    return ci_type, hidden


def clip_by_group(clip_components: float | None, clip_ci: float | None) -> optax.GradientTransformation:
    """Clip the global gradient norm of the components and of the CI functions separately."""

    def init_fn(params):
        return optax.EmptyState()

    def clip(tree, max_norm):
        if max_norm is None:
            return tree
        norm = optax.tree.norm(tree)
        scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))
        return jax.tree.map(lambda g: g * scale, tree)

    def update_fn(updates: SPDParams, state, params=None):
        return SPDParams(clip(updates.components, clip_components), clip(updates.ci, clip_ci)), state

    return optax.GradientTransformation(init_fn, update_fn)


def faithfulness_warmup(params: SPDParams, target: Target, cfg: OptimConfig) -> SPDParams:
    """`faithfulness_warmup_steps` of AdamW on the faithfulness loss alone (components only), in one jit."""
    n = cfg.faithfulness_warmup_steps
    if n == 0:
        return params
    opt = optax.adamw(cfg.faithfulness_warmup_lr, weight_decay=cfg.faithfulness_warmup_weight_decay)

    @jax.jit
    def run(components, target):
        kernels = target.kernels()

        def step(carry, _):
            comps, st = carry
            g = jax.grad(faithfulness_loss)(comps, kernels, target.sites)
            upd, st = opt.update(g, st, comps)
            return (optax.apply_updates(comps, upd), st), None

        (comps, _), _ = jax.lax.scan(step, (components, opt.init(components)), None, length=n)
        return comps

    return SPDParams(run(params.components, target), params.ci)


def spd_optimizer(optim: OptimConfig) -> optax.GradientTransformation:
    """SPD's optimiser: per-group clipping, then Adam with the schedule."""
    return make_optimizer(optim, clip_by_group(optim.clip_components, optim.clip_ci))


class SPD(Method):
    name = "spd"
    sections = ("ci", "loss")
    params_type = SPDParams

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, optim: OptimConfig) -> "SPD":
        ci_type, ci_hidden = ci_settings_from(cfg.get("ci"))
        return cls(SPDSettings(ci_type, ci_hidden, loss_config_from(cfg.get("loss"))))

    @classmethod
    def with_loss(cls, loss: LossConfig, ci_type: str = "mlp", ci_hidden: tuple[int, ...] = (16,)) -> "SPD":
        return cls(SPDSettings(ci_type, tuple(ci_hidden), loss))

    def init_params(self, key: Array, target: Target, dtype=jnp.float32) -> SPDParams:
        return init_decomposition(key, target, self.settings.ci_type, self.settings.ci_hidden, dtype)

    def prepare(self, params: SPDParams, target: Target, optim: OptimConfig) -> SPDParams:
        return faithfulness_warmup(params, target, optim)

    def gradient_transforms(self, optim: OptimConfig):
        return (clip_by_group(optim.clip_components, optim.clip_ci),)

    def param_specs(self, params: SPDParams, mesh):
        return sharding.param_specs(params, mesh)

    def loss(self, params, target, batch, key, progress):
        return loss_fn(params, target, batch, key, self.settings.loss, progress)

    def grad_metrics(self, grads: SPDParams):
        return {"grad_norm/components": optax.tree.norm(grads.components), "grad_norm/ci": optax.tree.norm(grads.ci)}

    def eval_metrics(self, params, target, batch, key):
        _, metrics = loss_fn(params, target, batch, key, self.settings.loss, 1.0, tuple(TERMS))
        return metrics

    def analyze(self, params, exp: Experiment, batch, workdir: Path | None) -> dict:
        """Alive counts (`spdjax.metrics.alive_counts`) on the held-out `batch`, then the family's
        ground-truth analysis (which may recompute them on its own held-out inputs)."""
        ci = metrics.batch_ci(params, exp.target, batch, self.settings.loss.sigmoid)
        out = metrics.alive_counts(params.components, exp.target.sites, ci)
        if exp.analyze is not None:
            out.update(exp.analyze(params, exp.target, workdir, self.settings.loss))
        return out

    def export(self, path: Path, params, target: Target, extra: dict) -> None:
        export.save(path, params, target.sites, self.settings.ci_type, self.settings.ci_hidden, extra=extra)

    def load(self, path: Path, target: Target):
        dec = export.load(path)
        if dec.sites != target.sites:
            raise ValueError(f"{path} does not match the config's target sites")
        return dec.params, dec.extra
