"""Training the ResidMLP target deterministically, and caching it.

Recipe (toy_models.md): labels y = x + ReLU(x); features active with probability 0.01, active values
U[-1, 1]; AdamW (weight decay 0.01), lr 3e-3 with the reference's cosine (lr * (1 + cos(pi t/(T-1)))/2),
batch 2048, 1k / 1k / 10k steps for 1 / 2 / 3 layers; loss mean((y_hat - y)^2). W_E is fixed (random
unit rows) and not trained. Init mirrors PyTorch's nn.Linear: kernels ~ U(+-1/sqrt(fan_in)).
The seed gives W_E (`fold_in(key, 0)`), the MLP init (`fold_in(key, 1)`) and the data (`fold_in(key, 2)`).

`load_or_train` caches the result under `cache_dir/resid_mlp-<nf>-<dmlp>x<L>-<hash>.npz` (+ a JSON
sidecar), keyed by a hash of the whole target config. A damaged or wrongly shaped cache entry (or
`weights_path` file) is a one-line error naming the file and what to do (delete a cache entry to retrain).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

from experiments.cache import atomic_write, cache_remedy, file_remedy, read_npz, read_sidecar
from experiments.resid_mlp.model import random_embedding, resid_mlp_forward
from spdjax.config import dataclass_from

CACHE_FORMAT = 1  # bump when the trainer changes in a way that changes its results
WEIGHT_NAMES = ("W_E", "W_in", "W_out")


@dataclasses.dataclass(frozen=True)
class ResidMLPTargetConfig:
    """The `target` section of a ResidMLP run config."""

    n_features: int
    d_mlp: int  # per layer
    n_layers: int
    d_embed: int = 1000
    steps: int = 1000
    batch_size: int = 2048
    lr: float = 3e-3
    weight_decay: float = 0.01
    feature_prob: float = 0.01
    seed: int = 0
    # a user-supplied target: .npz with W_E (n_features, d_embed), W_in (n_layers, d_embed, d_mlp),
    # W_out (n_layers, d_mlp, d_embed) (nnx.Linear kernel layout, y = x @ kernel)
    weights_path: str = ""

    def __post_init__(self):
        for f in ("n_features", "d_mlp", "n_layers", "d_embed", "steps", "batch_size"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"config.target.{f} must be an int >= 1, got {v!r}")
        if not 0.0 < self.feature_prob <= 1.0:
            raise ValueError(f"config.target.feature_prob must be in (0, 1], got {self.feature_prob!r}")
        if not self.lr > 0:
            raise ValueError(f"config.target.lr must be > 0, got {self.lr!r}")

    @classmethod
    def from_section(cls, section: Any) -> "ResidMLPTargetConfig":
        """From a ConfigDict / dict; unknown fields are an error naming them."""
        if section is None:
            raise ValueError("config.target is required for the resid_mlp experiment")
        values = section.to_dict() if hasattr(section, "to_dict") else dict(section)
        return dataclass_from(cls, values, "target", required=("n_features", "d_mlp", "n_layers"))

    def cache_key(self) -> str:
        blob = json.dumps({"format": CACHE_FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        L, d, m = self.n_layers, self.d_embed, self.d_mlp
        return {"W_E": (self.n_features, d), "W_in": (L, d, m), "W_out": (L, m, d)}


def sample_features(
    key: Array, batch_size: int, n_features: int, feature_prob: float
) -> Float[Array, "batch n_features"]:
    """Sparse features: each active with probability p, active values U[-1, 1], else 0 (float32)."""
    k_on, k_val = jax.random.split(key)
    on = jax.random.uniform(k_on, (batch_size, n_features)) < feature_prob
    vals = jax.random.uniform(k_val, (batch_size, n_features), jnp.float32, -1.0, 1.0)
    return jnp.where(on, vals, 0.0)


def labels(x: Array) -> Array:
    """y = x + ReLU(x)."""
    return x + jax.nn.relu(x)


def cosine_lr(lr: float, steps: int):
    """The reference's half-period cosine from lr (step 0) to 0 (step steps-1)."""
    return lambda i: lr * 0.5 * (1.0 + jnp.cos(jnp.pi * i / max(steps - 1, 1)))


def init_weights(key: Array, cfg: ResidMLPTargetConfig) -> dict[str, Array]:
    """`{"W_E", "W_in", "W_out"}`: the fixed embedding and PyTorch-default MLP kernels."""
    shapes = cfg.shapes
    k_in, k_out = jax.random.split(jax.random.fold_in(key, 1))
    b_in, b_out = 1.0 / np.sqrt(cfg.d_embed), 1.0 / np.sqrt(cfg.d_mlp)
    return {
        "W_E": random_embedding(jax.random.fold_in(key, 0), cfg.n_features, cfg.d_embed),
        "W_in": jax.random.uniform(k_in, shapes["W_in"], jnp.float32, -b_in, b_in),
        "W_out": jax.random.uniform(k_out, shapes["W_out"], jnp.float32, -b_out, b_out),
    }


@functools.partial(jax.jit, static_argnames=("cfg",))
def _train(key, cfg: ResidMLPTargetConfig):
    w = init_weights(key, cfg)
    W_E = w["W_E"]
    k_data = jax.random.fold_in(key, 2)
    params = {"W_in": w["W_in"], "W_out": w["W_out"]}
    opt = optax.adamw(
        cosine_lr(float(cfg.lr), cfg.steps), b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=float(cfg.weight_decay),
    )

    def loss_fn(p, x):
        return jnp.mean((resid_mlp_forward(W_E, p["W_in"], p["W_out"], x) - labels(x)) ** 2)

    def step(carry, i):
        p, st = carry
        x = sample_features(
            jax.random.fold_in(k_data, i), cfg.batch_size, cfg.n_features, float(cfg.feature_prob)
        )
        loss, g = jax.value_and_grad(loss_fn)(p, x)
        upd, st = opt.update(g, st, p)
        return (optax.apply_updates(p, upd), st), loss

    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(cfg.steps))
    return W_E, params["W_in"], params["W_out"], losses


def train_resid_mlp(cfg: ResidMLPTargetConfig) -> tuple[dict[str, np.ndarray], dict]:
    """One training run from `cfg.seed` (the whole loop is one jitted `lax.scan`).

    Returns `({"W_E", "W_in", "W_out"} as NumPy, info)`.
    """
    t0 = time.perf_counter()
    out = _train(jax.random.PRNGKey(cfg.seed), dataclasses.replace(cfg, weights_path=""))
    W_E, W_in, W_out, losses = (np.asarray(a) for a in out)
    tail = losses[-min(100, len(losses)):]
    info = {
        "seed_used": int(cfg.seed),
        "final_loss": float(np.mean(tail)),
        "initial_loss": float(losses[0]),
        "train_time_s": time.perf_counter() - t0,
        "platform": jax.default_backend(),
    }
    return {"W_E": W_E, "W_in": W_in, "W_out": W_out}, info


def cache_paths(cfg: ResidMLPTargetConfig, cache_dir: Path) -> tuple[Path, Path]:
    stem = f"resid_mlp-{cfg.n_features}-{cfg.d_mlp}x{cfg.n_layers}-{cfg.cache_key()}"
    return Path(cache_dir) / f"{stem}.npz", Path(cache_dir) / f"{stem}.json"


def target_shapes(cfg: ResidMLPTargetConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """The arrays of a ResidMLP target file: `{name: (shape, what the shape is)}`."""
    desc = {"W_E": "(n_features, d_embed)", "W_in": "(n_layers, d_embed, d_mlp)", "W_out": "(n_layers, d_mlp, d_embed)"}
    return {k: (cfg.shapes[k], desc[k]) for k in WEIGHT_NAMES}


def load_weights(cfg: ResidMLPTargetConfig) -> tuple[dict[str, np.ndarray], dict]:
    """`(weights, info)` from `cfg.weights_path`; clear one-line errors for a missing or wrong file."""
    path = Path(cfg.weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"config.target.weights_path: target file {str(path)!r} does not exist")
    shapes = target_shapes(cfg)
    w = read_npz(path, shapes, "config.target.weights_path", file_remedy(shapes))
    info = {"seed_used": -1, "final_loss": float("nan"), "initial_loss": float("nan"),
            "train_time_s": 0.0, "platform": "file", "cached": False, "cache_file": str(path)}
    return w, info


def load_or_train(
    cfg: ResidMLPTargetConfig, cache_dir: Path | None, trainer=None
) -> tuple[dict[str, np.ndarray], dict]:
    """The trained target `(weights, info)`, from the cache when present, else trained and cached.

    `cache_dir=None` disables caching. `info["cached"]` says whether it came from the cache.
    With `cfg.weights_path`, the target is read from that file instead (never trained).
    `trainer(cfg) -> (weights, info)` defaults to `train_resid_mlp`.
    """
    if cfg.weights_path:
        return load_weights(cfg)
    trainer = trainer or train_resid_mlp
    if cache_dir is None:
        w, info = trainer(cfg)
        return w, {**info, "cached": False}
    cache_dir = Path(cache_dir)
    npz, sidecar = cache_paths(cfg, cache_dir)
    if npz.exists() and sidecar.exists():
        w = read_npz(npz, target_shapes(cfg), "target cache", cache_remedy(sidecar))
        info = read_sidecar(sidecar, npz)
        return w, {**info, "cached": True, "cache_file": str(npz)}
    w, info = trainer(cfg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(npz, lambda f: np.savez(f, **w))
    meta = {"config": dataclasses.asdict(cfg), "cache_format": CACHE_FORMAT, "info": info}
    atomic_write(sidecar, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    return w, {**info, "cached": False, "cache_file": str(npz)}
