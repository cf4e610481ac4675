"""Training the induction-head target (transformers.md) and checking that it formed the circuit.

AdamW (lr 1e-3, weight decay 0.01), linear warm-up over 1000 steps then constant, batch 1024, fresh
sequences every step, up to 100k steps; every `eval_every` steps the last-token accuracy on 8192
held-out sequences, stopping once it reaches `target_accuracy` (0.99). The circuit scores: the layer-0
head's mean attention to the previous token (`prev_token_score`) and the layer-1 head's attention from
the final S to M's position (`induction_score`).

    python -m experiments.ih.train_target [--out=.cache/targets/ih.npz] [--max_steps=100000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.cache import atomic_write, nnx_arrays, set_nnx_arrays
from experiments.ih.data import sample
from experiments.ih.model import InductionTransformer, attention_scores


@dataclasses.dataclass(frozen=True)
class IHTargetConfig:
    d_model: int = 16
    n_layers: int = 2
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    batch_size: int = 1024
    max_steps: int = 100_000
    eval_every: int = 500
    eval_size: int = 8192
    target_accuracy: float = 0.99
    seed: int = 0


def circuit_scores(model: InductionTransformer, batch: dict) -> dict[str, float]:
    """Layer-0 mean attention to the previous token (positions 1..T-1, and from M to S) and layer-1
    attention from the final position (S) to M's position (`model.attention_scores`)."""
    s = attention_scores(model.patterns(batch["tokens"]), batch["m_pos"])
    return {
        "prev_token_score": float(s["prev_token_score"]),
        "prev_token_score_at_m": float(s["prev_at_m"]),
        "induction_score": float(s["induction"]),
    }


def last_token_accuracy(model: InductionTransformer, batch: dict) -> float:
    logits = model(batch["tokens"])[:, -1]
    return float(jnp.mean(jnp.argmax(logits, -1) == batch["label"]))


def flat_state(model: InductionTransformer) -> dict[str, np.ndarray]:
    return nnx_arrays(model)


def from_flat_state(cfg: IHTargetConfig, arrays: dict[str, np.ndarray] | None) -> InductionTransformer:
    """A model of `cfg`'s shapes holding `arrays` (None: untrained)."""
    model = InductionTransformer(cfg.d_model, cfg.n_layers, rngs=nnx.Rngs(0))
    return model if arrays is None else set_nnx_arrays(model, arrays)


def train(cfg: IHTargetConfig, progress: bool = True) -> tuple[InductionTransformer, dict]:
    model = InductionTransformer(cfg.d_model, cfg.n_layers, rngs=nnx.Rngs(cfg.seed))
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), optax.constant_schedule(cfg.lr)], [cfg.warmup_steps]
    )
    opt = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=cfg.weight_decay), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, key):
        batch = sample(key, cfg.batch_size)

        def loss_fn(model):
            logits = model(batch["tokens"])[:, -1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    held = sample(jax.random.key(10_000 + cfg.seed), cfg.eval_size)
    key = jax.random.key(cfg.seed)
    t0, acc, history = time.perf_counter(), 0.0, []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, unit="step", dynamic_ncols=True)
    steps = 0
    for steps in range(1, cfg.max_steps + 1):
        loss = step(model, opt, jax.random.fold_in(key, steps))
        if bar is not None:
            bar.update(1)
        if steps % cfg.eval_every == 0:
            acc = last_token_accuracy(model, held)
            history.append((steps, float(loss), acc))
            if bar is not None:
                bar.set_postfix_str(f"loss={float(loss):.4f} acc={acc:.4f}")
            if acc >= cfg.target_accuracy:
                break
    if bar is not None:
        bar.close()
    info = {
        "steps": steps, "accuracy": acc, "seed": cfg.seed, "train_time_s": time.perf_counter() - t0,
        "reached_target": acc >= cfg.target_accuracy, "history": history, **circuit_scores(model, held),
    }
    return model, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".cache/targets/ih.npz")
    ap.add_argument("--max_steps", type=int, default=100_000)
    ap.add_argument("--batch_size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    cfg = IHTargetConfig(max_steps=a.max_steps, batch_size=a.batch_size, seed=a.seed)
    model, info = train(cfg)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = flat_state(model)
    atomic_write(out, lambda f: np.savez(f, **arrays))
    meta = {"config": dataclasses.asdict(cfg), "info": info}
    atomic_write(out.with_suffix(".json"), lambda f: f.write(json.dumps(meta, indent=2).encode()))
    print(json.dumps({k: v for k, v in info.items() if k != "history"}))


if __name__ == "__main__":
    main()
