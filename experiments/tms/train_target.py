"""Training the TMS target deterministically, checking that it represents every feature, and caching it.

Recipe (toy_models.md): AdamW (weight decay 0.01), constant lr 5e-3, 10k steps, batch 1024 (5-2) or
8192 (40-10), feature probability 0.05, active values U[0, 1], loss mean((x - x_hat)^2).
Init mirrors the reference's PyTorch layers: W ~ U(+-1/sqrt(n_features)) and b ~ U(+-1/sqrt(n_hidden))
(b = 0 with `bias_init_zero`, used for 40-10).

A target that drops features makes the decomposition meaningless, so `train_represented` trains seed,
seed+1, ... until every feature is represented (`model.represented_features`) and records the seed
it used. `load_or_train` caches the result under `cache_dir/tms-<nf>-<nh>-<hash>.npz` (+ a JSON
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
from experiments.tms.model import represented_features, tms_forward
from spdjax.config import dataclass_from

CACHE_FORMAT = 1  # bump when the trainer changes in a way that changes its results


@dataclasses.dataclass(frozen=True)
class TMSTargetConfig:
    """The `target` section of a TMS run config."""

    n_features: int
    n_hidden: int
    steps: int = 10_000
    batch_size: int = 1024
    lr: float = 5e-3
    weight_decay: float = 0.01
    feature_prob: float = 0.05
    seed: int = 0
    bias_init_zero: bool = False
    require_all_features: bool = True
    max_seed_tries: int = 20
    probe_value: float = 0.75  # represented-feature check: input probe_value * e_i ...
    probe_tol: float = 0.1  # ... must give output i within probe_tol of probe_value
    weights_path: str = ""  # a user-supplied target: .npz with W (n_hidden, n_features), b (n_features,)

    def __post_init__(self):
        for f in ("n_features", "n_hidden", "steps", "batch_size", "max_seed_tries"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"config.target.{f} must be an int >= 1, got {v!r}")
        if not 0.0 < self.feature_prob <= 1.0:
            raise ValueError(f"config.target.feature_prob must be in (0, 1], got {self.feature_prob!r}")
        if not self.lr > 0:
            raise ValueError(f"config.target.lr must be > 0, got {self.lr!r}")

    @classmethod
    def from_section(cls, section: Any) -> "TMSTargetConfig":
        """From a ConfigDict / dict; unknown fields are an error naming them."""
        if section is None:
            raise ValueError("config.target is required for the tms experiment")
        values = section.to_dict() if hasattr(section, "to_dict") else dict(section)
        return dataclass_from(cls, values, "target", required=("n_features", "n_hidden"))

    def cache_key(self) -> str:
        blob = json.dumps({"format": CACHE_FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sample_features(
    key: Array, batch_size: int, n_features: int, feature_prob: float
) -> Float[Array, "batch n_features"]:
    """Sparse features: each active with probability p, active values U[0, 1], else 0 (float32)."""
    k_on, k_val = jax.random.split(key)
    on = jax.random.uniform(k_on, (batch_size, n_features)) < feature_prob
    vals = jax.random.uniform(k_val, (batch_size, n_features), jnp.float32)
    return jnp.where(on, vals, 0.0)


def init_params(key: Array, n_features: int, n_hidden: int, bias_init_zero: bool) -> dict[str, Array]:
    """`{"W": (n_hidden, n_features), "b": (n_features,)}` with PyTorch nn.Linear's default init."""
    kw, kb = jax.random.split(key)
    bw, bb = 1.0 / np.sqrt(n_features), 1.0 / np.sqrt(n_hidden)
    W = jax.random.uniform(kw, (n_hidden, n_features), jnp.float32, -bw, bw)
    b = (
        jnp.zeros((n_features,), jnp.float32)
        if bias_init_zero
        else jax.random.uniform(kb, (n_features,), jnp.float32, -bb, bb)
    )
    return {"W": W, "b": b}


@functools.partial(
    jax.jit,
    static_argnames=(
        "n_features", "n_hidden", "steps", "batch_size", "lr", "weight_decay", "feature_prob",
        "bias_init_zero",
    ),
)
def _train(
    key, *, n_features, n_hidden, steps, batch_size, lr, weight_decay, feature_prob, bias_init_zero
):
    k_init, k_data = jax.random.split(key)
    params = init_params(k_init, n_features, n_hidden, bias_init_zero)
    opt = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)

    def loss_fn(p, x):
        return jnp.mean((x - tms_forward(p["W"], p["b"], x)) ** 2)

    def step(carry, i):
        p, st = carry
        x = sample_features(jax.random.fold_in(k_data, i), batch_size, n_features, feature_prob)
        loss, g = jax.value_and_grad(loss_fn)(p, x)
        upd, st = opt.update(g, st, p)
        return (optax.apply_updates(p, upd), st), loss

    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(steps))
    return params["W"], params["b"], losses


def train_tms(cfg: TMSTargetConfig, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training run from `seed` (the whole loop is one jitted `lax.scan`).

    Returns `(W (n_hidden, n_features), b (n_features,), losses (steps,))` as NumPy arrays.
    """
    W, b, losses = _train(
        jax.random.PRNGKey(seed),
        n_features=cfg.n_features, n_hidden=cfg.n_hidden, steps=cfg.steps,
        batch_size=cfg.batch_size, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay),
        feature_prob=float(cfg.feature_prob), bias_init_zero=bool(cfg.bias_init_zero),
    )
    return np.asarray(W), np.asarray(b), np.asarray(losses)


def train_represented(cfg: TMSTargetConfig, trainer=None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Train from `cfg.seed`, then `cfg.seed + 1`, ... until every feature is represented.

    With `require_all_features=False` the first seed is kept whatever it represents. Raises
    RuntimeError after `max_seed_tries` seeds. Returns `(W, b, info)`; `info["seed_used"]` is the seed.
    """
    trainer = trainer or train_tms
    tries = []
    t0 = time.perf_counter()
    for t in range(cfg.max_seed_tries):
        seed = cfg.seed + t
        W, b, losses = trainer(cfg, seed)
        rep = represented_features(W, b, cfg.probe_value, cfg.probe_tol)
        tail = losses[-min(100, len(losses)):]
        tries.append({"seed": seed, "n_represented": int(rep.sum()), "final_loss": float(np.mean(tail))})
        if rep.all() or not cfg.require_all_features:
            info = {
                "seed_used": seed,
                "n_represented": int(rep.sum()),
                "represented": rep.tolist(),
                "final_loss": tries[-1]["final_loss"],
                "tries": tries,
                "train_time_s": time.perf_counter() - t0,
                "platform": jax.default_backend(),
            }
            return W, b, info
    raise RuntimeError(
        f"TMS {cfg.n_features}-{cfg.n_hidden}: no seed in {cfg.seed}..{cfg.seed + cfg.max_seed_tries - 1} "
        f"trained a target representing all {cfg.n_features} features "
        f"(represented per seed: {[(t['seed'], t['n_represented']) for t in tries]}); raise "
        "config.target.max_seed_tries, change the recipe, or set require_all_features=False"
    )


def cache_paths(cfg: TMSTargetConfig, cache_dir: Path) -> tuple[Path, Path]:
    stem = f"tms-{cfg.n_features}-{cfg.n_hidden}-{cfg.cache_key()}"
    return Path(cache_dir) / f"{stem}.npz", Path(cache_dir) / f"{stem}.json"


def target_shapes(cfg: TMSTargetConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """The arrays of a TMS target file: `{name: (shape, what the shape is)}`."""
    return {"W": ((cfg.n_hidden, cfg.n_features), "(n_hidden, n_features)"), "b": ((cfg.n_features,), "(n_features,)")}


def load_weights(cfg: TMSTargetConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """`(W, b, info)` from `cfg.weights_path`; clear one-line errors for a missing, damaged or wrong file."""
    path = Path(cfg.weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"config.target.weights_path: target file {str(path)!r} does not exist")
    shapes = target_shapes(cfg)
    w = read_npz(path, shapes, "config.target.weights_path", file_remedy(shapes))
    info = {"seed_used": -1, "n_represented": -1, "final_loss": float("nan"), "train_time_s": 0.0,
            "platform": "file", "tries": [], "cached": False, "cache_file": str(path)}
    return w["W"], w["b"], info


def load_or_train(
    cfg: TMSTargetConfig, cache_dir: Path | None, trainer=None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """The trained target `(W, b, info)`, from the cache when present, else trained and cached.

    `cache_dir=None` disables caching. `info["cached"]` says whether it came from the cache.
    With `cfg.weights_path`, the target is read from that file instead (never trained).
    """
    if cfg.weights_path:
        return load_weights(cfg)
    if cache_dir is None:
        W, b, info = train_represented(cfg, trainer)
        return W, b, {**info, "cached": False}
    cache_dir = Path(cache_dir)
    npz, sidecar = cache_paths(cfg, cache_dir)
    if npz.exists() and sidecar.exists():
        w = read_npz(npz, target_shapes(cfg), "target cache", cache_remedy(sidecar))
        info = read_sidecar(sidecar, npz)
        return w["W"], w["b"], {**info, "cached": True, "cache_file": str(npz)}
    W, b, info = train_represented(cfg, trainer)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(npz, lambda f: np.savez(f, W=W, b=b))
    meta = {"config": dataclasses.asdict(cfg), "cache_format": CACHE_FORMAT, "info": info}
    atomic_write(sidecar, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    return W, b, {**info, "cached": False, "cache_file": str(npz)}
