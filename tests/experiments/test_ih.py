"""The induction-head toy: its data generator, the target's shapes, the circuit scores and the cached
state's round trip (the decomposition recipe is issue 25's open part)."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from browser import check_report
from flax import nnx

from experiments.ih import data as ih_data
from experiments.ih.model import BOS, S_TOKEN, VOCAB, InductionTransformer
from experiments.ih.train_target import IHTargetConfig, circuit_scores, flat_state, from_flat_state, train
from spdjax.interpret.harvest import HarvestConfig


def test_sequences_follow_the_spec():
    b = jax.device_get(ih_data.sample(jax.random.key(0), 512))
    tok, label, m_pos = b["tokens"], b["label"], b["m_pos"]
    assert tok.shape == (512, 64) and tok.dtype == np.int32
    assert (tok[:, 0] == BOS).all() and (tok[:, -1] == S_TOKEN).all()
    rows = np.arange(512)
    assert (tok[rows, m_pos - 1] == S_TOKEN).all() and (tok[rows, m_pos] == label).all()
    assert ((tok == S_TOKEN).sum(1) == 2).all()  # the earlier S and the final one
    assert (m_pos >= 3).all() and (m_pos <= 62).all()  # p in [1, 61): S at 1 + p, M at 2 + p
    body = tok[:, 1:-1]
    assert ((body >= 1) & (body <= 128) | (body == S_TOKEN)).all()
    assert len(np.unique(label)) > 100  # M uniform over 1..128


def test_model_shapes_and_sites():
    import spdjax

    model = InductionTransformer(rngs=nnx.Rngs(0))
    tokens = ih_data.sample(jax.random.key(1), 4)["tokens"]
    assert model(tokens).shape == (4, 64, VOCAB)
    a0, a1 = model.patterns(tokens)
    np.testing.assert_allclose(a0.sum(-1), 1.0, rtol=1e-5)
    assert float(jnp.abs(jnp.triu(a0, 1)).max()) == 0.0  # causal
    target = spdjax.from_nnx(model, sites={"blocks.*.attn.*": 8})
    assert sorted(s.name for s in target.sites) == sorted(
        f"blocks.{l}.attn.{m}" for l in range(2) for m in "qkvo"
    )


def test_circuit_scores_on_synthetic_patterns():
    model = InductionTransformer(rngs=nnx.Rngs(0))
    batch = ih_data.sample(jax.random.key(2), 8)
    T = 64
    prev = jnp.broadcast_to(jnp.eye(T, k=-1).at[0, 0].set(1.0), (8, T, T))
    ind = jnp.zeros((8, T, T)).at[jnp.arange(8), -1, batch["m_pos"]].set(1.0)
    model.patterns = lambda tokens: [prev, ind]
    assert circuit_scores(model, batch) == {"prev_token_score": 1.0, "prev_token_score_at_m": 1.0, "induction_score": 1.0}


def test_training_runs_and_state_round_trips():
    cfg = IHTargetConfig(max_steps=4, eval_every=2, batch_size=16, eval_size=32, warmup_steps=2)
    model, info = train(cfg, progress=False)
    assert info["steps"] == 4 and 0.0 <= info["accuracy"] <= 1.0
    assert {"prev_token_score", "induction_score", "train_time_s"} <= set(info)
    tokens = ih_data.sample(jax.random.key(3), 2)["tokens"]
    again = from_flat_state(cfg, flat_state(model))
    np.testing.assert_array_equal(again(tokens), model(tokens))


def test_smoke_run_end_to_end(tmp_path, request):
    """configs/ih.py:smoke through the runner: a briefly trained target, q/k/v/o of both layers decomposed
    with KL on the last position, and the analysis keys."""
    from helpers import run_config

    from spdjax.config import load_config_file

    cfg = load_config_file(Path(__file__).resolve().parents[2] / "configs" / "ih.py", "smoke")
    s = run_config(cfg, tmp_path / "run", tmp_path / "cache", quiet=True)
    for k in ("target_accuracy", "target_ce", "target_prev_token_score", "target_prev_token_score_at_m",
              "target_induction_score", "ci_l0_final_token/blocks.1.attn.q", "ci_l0/blocks.0.attn.v",
              "n_alive/blocks.0.attn.k", "attention_kl/0", "attention_kl_circuit/1", "qk_offset/0/active_corr",
              "ablation/blocks.1.attn.k/M/induction", "ablation/blocks.0.attn.q/M/control_prev_at_m"):
        assert k in s, k
    for masking in ("unmasked", "ci", "rounded_ci", "stochastic", "zero"):
        assert 0.0 <= s[f"accuracy/{masking}"] <= 1.0 and s[f"ce/{masking}"] > 0.0
    assert s["steps"] == 6 and "final/loss/ci_masked_recon" in s
    for fig in ("ih_attention", "ih_attention_offsets", "ih_ablation", "ih_qk_offset", "ih_ci_tokens"):
        assert (tmp_path / "run" / f"{fig}.png").stat().st_size > 0, fig

    # the component browser of the finished run: token examples with the attention row of attention sites
    import experiments
    from spdjax.interpret import store
    from spdjax.interpret.workflow import report_workdir

    page = report_workdir(cfg, tmp_path / "run", experiments.builder(tmp_path / "cache"),
                          {**dataclasses.asdict(HarvestConfig()), "n_rows": 2048}, log=lambda s: None)
    meta = store.read_meta(tmp_path / "run" / "harvest" / "harvest.sqlite")
    assert meta["input_kind"] == "tokens" and meta["n_rows"] >= 2048 and meta["summary"]["steps"] == 6
    best = check_report(request.getfixturevalue("driver"), page, tmp_path / "report.png")
    assert best["examples"]["top"][0]["attention"] and best["tokens"]["input"]
