import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import spdjax
from spdjax.losses import LossContext, TermOptions, loss_config_from, register_term


@dataclasses.dataclass(frozen=True)
class UNormOptions(TermOptions):  # `coeff` comes with TermOptions; every option needs a default
    power: float = 2.0


@register_term("u_norm", UNormOptions)
def u_norm(ctx: LossContext, opts: UNormOptions):
    """Mean |U|^power over every site's components (a toy regulariser)."""
    return sum(jnp.mean(jnp.abs(c.U) ** opts.power) for c in ctx.params.components.values())


config = loss_config_from(dict(terms=dict(stochastic_recon=dict(coeff=1.0), u_norm=dict(coeff=0.1, power=1.0))))
target = spdjax.from_nnx(nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0))), sites={"layers.0": 4})
params = spdjax.init_decomposition(jax.random.key(0), target)
loss, metrics = jax.jit(spdjax.loss_fn, static_argnums=4)(params, target, jnp.ones((16, 8)), jax.random.key(1), config)
print(float(loss), float(metrics["loss/u_norm"]))
