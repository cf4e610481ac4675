"""The induction-head toy (transformers.md): the 2-layer attention-only target (`model`), its task
(`data`), its training with the circuit check (`train_target`), what a decomposition found
(`analysis`) and the family's `build`.

Batches are dicts `{"tokens": (B, 64), "loss_mask": (B, 64)}` with the loss mask on the last position
only (the spec's KL on the last token); the target's call reads `tokens`. The held-out eval batch
(`eval_batch_size` sequences) is the one the analysis uses. `configs/ih.py` holds the recipe that
succeeds on this CPU (docs/results.md).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import spdjax
from experiments.cache import cached_nnx_target
from experiments.ih.analysis import make_analyze
from experiments.ih.data import sample
from experiments.ih.model import BOS, S_TOKEN, VOCAB, InductionTransformer
from experiments.ih.train_target import (
    IHTargetConfig,
    circuit_scores,
    from_flat_state,
    last_token_accuracy,
    train,
)
from spdjax.experiment import Experiment, TokenInfo
from spdjax.fields import dataclass_from, to_dict

__all__ = ["IHTargetConfig", "InductionTransformer", "build", "load_or_train", "sample"]


def load_or_train(cfg: IHTargetConfig, cache_dir: Path) -> tuple[InductionTransformer, dict]:
    """The trained target, from `cache_dir/ih-<hash>.npz` (+ .json) when present, else trained and cached."""
    return cached_nnx_target(
        "ih", dataclasses.asdict(cfg), cache_dir, lambda: from_flat_state(cfg, None), lambda: train(cfg)
    )


def _last_position_mask(batch_size: int, T: int = 64) -> jnp.ndarray:
    return jnp.zeros((batch_size, T), jnp.float32).at[:, -1].set(1.0)


def build(run, cache_dir: Path) -> Experiment:
    tcfg = dataclass_from(IHTargetConfig, to_dict(run.target, "target"), "target")
    model, info = load_or_train(tcfg, cache_dir)
    target = spdjax.from_nnx(
        model, sites=run.sites, tied=dict(run.tied), identity=run.identity or (), call=lambda m, b: m(b["tokens"])
    )

    def batch_fn(key):
        return {"tokens": sample(key, run.batch_size)["tokens"], "loss_mask": _last_position_mask(run.batch_size)}

    held = sample(jax.random.key(10_000 + tcfg.seed), run.eval_batch_size)
    scores = circuit_scores(model, held)
    with_patterns = spdjax.from_nnx(model, sites=run.sites, call=lambda m, b: m.run(b["tokens"]))
    analyze = make_analyze(
        held, last_token_accuracy(model, held), scores, with_patterns.apply_fn, tcfg.d_model, run.seed
    )

    flat = {k: info[k] for k in ("steps", "accuracy", "seed", "train_time_s", "prev_token_score", "induction_score")}
    flat["cached"] = bool(info.get("cached", False))
    graph, state = nnx.split(model)

    def attention(batch):  # pure (jittable): {module path: (B, 1 head, T, T)}
        patterns = nnx.merge(graph, state).patterns(batch["tokens"])
        return {f"blocks.{i}.attn": p[:, None] for i, p in enumerate(patterns)}

    tokens = TokenInfo(VOCAB, lambda t: {BOS: "<bos>", S_TOKEN: "S"}.get(t, str(t)), attention)
    return Experiment(target=target, batch_fn=batch_fn, analyze=analyze, info=flat, tokens=tokens)
