"""Training the LM target on the offline corpus (`experiments.lm.data`), with the baselines it must beat.

AdamW with linear warm-up then cosine decay, random windows of `seq_len` tokens from the train plays,
next-token cross-entropy on every position. Reported on held-out windows (plays never trained on): the
target's CE, the unigram CE (token frequencies of the train split, add-one smoothed), and the
zero-ablation CE (every q/k/v/o/c_fc/down_proj kernel set to 0: the embed -> norm -> unembed path).

    python -m experiments.lm.train_target [--cache_dir=.cache/targets] [--steps=N]
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

from experiments.cache import cached_nnx_target
from experiments.lm import data
from experiments.lm.model import LlamaLM, LMShape, next_token_ce

SITE_MODULES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.c_fc", "mlp.down_proj")


@dataclasses.dataclass(frozen=True)
class LMTargetConfig:
    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 512
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 2000
    lr: float = 3e-3
    warmup_steps: int = 200
    weight_decay: float = 0.1
    eval_every: int = 500
    eval_windows: int = 256
    held_out_every: int = 10
    n_docs: int | None = None
    seed: int = 0

    @property
    def shape(self) -> LMShape:
        return LMShape(self.vocab_size, self.d_model, self.n_layers, self.n_heads, self.n_kv_heads, self.d_mlp)

    @property
    def data(self) -> data.DataConfig:
        return data.DataConfig(self.vocab_size, self.held_out_every, self.n_docs)


def unigram_ce(train: np.ndarray, held: np.ndarray, vocab_size: int) -> float:
    """CE (nats) of held-out tokens under the add-one smoothed unigram distribution of `train`."""
    counts = np.bincount(train.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[held.astype(np.int64)].mean())


def held_out_ce(model: LlamaLM, windows: np.ndarray, batch: int = 64) -> float:
    """Mean next-token CE over `windows (n, T)` (each window's T - 1 predictions)."""
    f = nnx.jit(lambda m, t: next_token_ce(m(t), t))
    vals = [float(f(model, jnp.asarray(windows[i : i + batch]))) * len(windows[i : i + batch])
            for i in range(0, len(windows), batch)]
    return sum(vals) / len(windows)


def zero_ablated(model: LlamaLM) -> LlamaLM:
    """A copy of `model` with every decomposable kernel (q/k/v/o/c_fc/down_proj) set to 0."""
    graphdef, state = nnx.split(model)
    out = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    for block in out.blocks:
        for name in SITE_MODULES:
            mod = block
            for part in name.split("."):
                mod = getattr(mod, part)
            mod.kernel[...] = jnp.zeros_like(mod.kernel[...])
    return out


def held_windows(corpus: data.Corpus, cfg: LMTargetConfig, n: int | None = None) -> np.ndarray:
    """`n` (default `cfg.eval_windows`) held-out windows, a fixed random choice in document order."""
    w = data.windows(corpus.held_out, cfg.seq_len)
    idx = np.random.default_rng(10_000 + cfg.seed).permutation(len(w))[: cfg.eval_windows if n is None else n]
    return w[np.sort(idx)]


def train(cfg: LMTargetConfig, corpus: data.Corpus, progress: bool = True) -> tuple[LlamaLM, dict]:
    model = LlamaLM(cfg.shape, rngs=nnx.Rngs(cfg.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1),
                                                  end_value=cfg.lr * 0.1)
    opt = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay)),
                        wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, tokens):
        loss, grads = nnx.value_and_grad(lambda m: next_token_ce(m(tokens), tokens))(model)
        opt.update(model, grads)
        return loss

    it = iter(data.train_dataset(corpus.train, cfg.seq_len, cfg.batch_size, cfg.seed).to_iter_dataset())
    held = held_windows(corpus, cfg)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, unit="step", dynamic_ncols=True, desc="LM target")
    t0, history, loss = time.perf_counter(), [], float("nan")
    for s in range(1, cfg.steps + 1):
        loss = step(model, opt, jnp.asarray(next(it)["tokens"]))
        if bar is not None:
            bar.update(1)
        if s % cfg.eval_every == 0 or s == cfg.steps:
            ce = held_out_ce(model, held)
            history.append((s, float(loss), ce))
            if bar is not None:
                bar.set_postfix_str(f"loss={float(loss):.3f} held-out CE={ce:.3f}")
    if bar is not None:
        bar.close()
    info = {
        "steps": cfg.steps, "seed": cfg.seed, "train_time_s": time.perf_counter() - t0, "history": history,
        "ce": history[-1][2] if history else float("nan"),
        "unigram_ce": unigram_ce(corpus.train, held[:, 1:].ravel(), cfg.vocab_size),
        "zero_ablation_ce": held_out_ce(zero_ablated(model), held),
        "train_tokens": int(corpus.train.size), "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
    }
    return model, info


def load_or_train(cfg: LMTargetConfig, cache_dir: Path, progress: bool = True) -> tuple[LlamaLM, dict, data.Corpus]:
    """The corpus (built or cached) and the trained target (trained or cached)."""
    corpus = data.prepare(cfg.data, cache_dir)
    model, info = cached_nnx_target(
        "lm", {**dataclasses.asdict(cfg), "data_key": corpus.tokenizer_path.parent.name}, cache_dir,
        lambda: LlamaLM(cfg.shape, rngs=nnx.Rngs(0)), lambda: train(cfg, corpus, progress),
    )
    return model, info, corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache_dir", default=".cache/targets")
    ap.add_argument("--steps", type=int, default=LMTargetConfig.steps)
    ap.add_argument("--batch_size", type=int, default=LMTargetConfig.batch_size)
    a = ap.parse_args()
    cfg = LMTargetConfig(steps=a.steps, batch_size=a.batch_size)
    _, info, _ = load_or_train(cfg, Path(a.cache_dir))
    print(json.dumps({k: v for k, v in info.items() if k != "history"}))


if __name__ == "__main__":
    main()
