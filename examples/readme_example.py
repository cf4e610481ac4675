import jax, optax, spdjax
from flax import nnx

class MLP(nnx.Module):  # any user model: sites are found by path, the code is not edited
    def __init__(self, rngs):
        self.up, self.down = nnx.Linear(8, 32, rngs=rngs), nnx.Linear(32, 8, rngs=rngs)
    def __call__(self, x):  # x: (batch, positions, 8)
        return self.down(jax.nn.gelu(self.up(x)))

target = spdjax.from_nnx(MLP(nnx.Rngs(0)), sites={"up": 16, "down": 16})
params = spdjax.init_decomposition(jax.random.key(0), target, ci_type="mlp", ci_hidden=(8,))
opt = optax.adam(1e-2); opt_state = opt.init(params)
grad_fn = jax.jit(jax.value_and_grad(spdjax.loss_fn, has_aux=True))
for step in range(6):
    x = jax.random.normal(jax.random.key(step), (64, 4, 8))
    (loss, metrics), grads = grad_fn(params, target, x, jax.random.key(1000 + step))
    updates, opt_state = opt.update(grads, opt_state); params = optax.apply_updates(params, updates)
    print(step, float(loss), float(metrics["loss/stochastic_recon"]))
