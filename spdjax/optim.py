"""Adam and its learning-rate schedules, shared by every method.

The LR rises linearly, `lr * t / W`, over the first `W = round(warmup_frac * steps)` steps, then follows
`schedule`:

| schedule | after the warm-up (step t of T) |
|---|---|
| `constant` | `lr` |
| `linear` | from `lr` down to `final_lr_frac * lr` over the `T - W` steps after the warm-up |
| `cosine` | half cosine from `lr` down to `final_lr_frac * lr` over the `T - W` steps after the warm-up |
| `apd_cosine` | the APD reference's quarter cosine on the absolute step: `lr * cos(pi/2 * t / (T - 1))` |
| `apd_linear` | the APD reference's linear decay on the absolute step: `lr * (1 - t / (T - 1))` |

A method adds its own gradient transformations in front of Adam (SPD: per-group clipping).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "linear", "cosine", "apd_cosine", "apd_linear")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Adam (b1 0.9, b2 0.999, eps 1e-8, no weight decay), its schedule (module docstring), and the
    method-specific knobs SPD reads (gradient clipping per group, the faithfulness warm-up)."""

    steps: int
    lr: float = 1e-3
    schedule: str = "cosine"
    warmup_frac: float = 0.0
    final_lr_frac: float = 0.0
    clip_components: float | None = None  # SPD: max global grad norm of U, V (None: no clipping)
    clip_ci: float | None = None  # SPD: max global grad norm of the CI functions
    faithfulness_warmup_steps: int = 200  # SPD: reference-main recipe; 0 for the paper recipe
    faithfulness_warmup_lr: float = 0.01
    faithfulness_warmup_weight_decay: float = 0.1

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"optim.steps must be an int >= 1, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule: unknown {self.schedule!r}; allowed: {list(SCHEDULES)}")
        for f in ("warmup_frac", "final_lr_frac"):
            v = getattr(self, f)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"optim.{f} must be in [0, 1], got {v!r}")
        for f in ("faithfulness_warmup_lr", "faithfulness_warmup_weight_decay"):
            v = getattr(self, f)
            if not v >= 0 or (f.endswith("lr") and v == 0):
                raise ValueError(f"optim.{f} must be {'> 0' if f.endswith('lr') else '>= 0'}, got {v!r}")
        for f in ("clip_components", "clip_ci"):
            v = getattr(self, f)
            if v is not None and not v > 0:
                raise ValueError(f"optim.{f} must be > 0 or None, got {v!r}")
        if self.faithfulness_warmup_steps < 0:
            raise ValueError(
                f"optim.faithfulness_warmup_steps must be >= 0, got {self.faithfulness_warmup_steps!r}"
            )


def _f32(t):
    return jnp.asarray(t, jnp.float32)


def warmup_steps(cfg: OptimConfig) -> int:
    return int(round(cfg.warmup_frac * cfg.steps))


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """`step -> lr` (module docstring)."""
    lr, T, W = float(cfg.lr), cfg.steps, warmup_steps(cfg)
    rest = max(T - W, 1)
    denom = max(T - 1, 1)
    if cfg.schedule == "constant":
        main, absolute = optax.constant_schedule(lr), True
    elif cfg.schedule == "linear":
        main, absolute = optax.linear_schedule(lr, lr * cfg.final_lr_frac, rest), False
    elif cfg.schedule == "cosine":
        main, absolute = optax.cosine_decay_schedule(lr, rest, alpha=cfg.final_lr_frac), False
    elif cfg.schedule == "apd_cosine":
        # clamped: float32 cos(pi/2) is -4e-8, which would make the last step's lr negative
        main, absolute = (lambda t: lr * jnp.maximum(jnp.cos(0.5 * math.pi * _f32(t) / denom), 0.0)), True
    else:
        main, absolute = (lambda t: lr * jnp.maximum(1.0 - _f32(t) / denom, 0.0)), True
    if W == 0:
        return main

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        after = main(t) if absolute else main(jnp.asarray(count) - W)
        return jnp.where(t < W, lr * t / W, after)

    return schedule


def make_optimizer(cfg: OptimConfig, *transforms: optax.GradientTransformation) -> optax.GradientTransformation:
    """`transforms` (a method's, e.g. clipping), then Adam with `make_schedule(cfg)`."""
    adam = optax.adam(make_schedule(cfg), b1=0.9, b2=0.999, eps=1e-8)
    return optax.chain(*transforms, adam) if transforms else adam
