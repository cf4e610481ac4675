"""configs/lm.py:smoke through the runner (a subprocess like launch.py): corpus, tokenizer and a tiny target
built and cached, the six matrices of both layers decomposed from the host-side iterator, the LM evaluation
keys, and a SIGKILLed run resumed exactly; a span of layers decomposed while the others run frozen."""

import json
import signal
from pathlib import Path

import numpy as np
import pytest
from helpers import fault_session, jsonl_records, saved_params

from spdjax.config import load_config_file

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "lm.py"
# 6 steps; log and checkpoint every 2, the evaluation once at the end
SHORT = {"optim.steps": 6, "log_every": 2, "checkpoint_every": 2, "eval_every": 6}


def test_smoke_run_end_to_end_and_a_sigkill_resumes_exactly(tmp_path):
    """The smoke config run to the end (its LM evaluation keys checked), and the same run SIGKILLed after
    step 4's log line then relaunched: it resumes from its last checkpoint, reads the same batches (the
    per-step losses equal) and ends with bitwise the same parameters."""
    cache = tmp_path / "cache"
    full = fault_session(tmp_path / "full", cache, "", CONFIG, "smoke", SHORT)
    assert full.returncode == 0, full.stderr[-3000:]
    s = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert s["steps"] == 6 and "final/loss/pgd_recon_subset" in s
    for m in ("unmasked", "ci", "rounded", "stochastic", "random", "zero"):
        assert s[f"ce/{m}"] > 0 and s[f"kl/{m}"] >= 0, m
    assert s["ce_unrecovered/zero"] == 1.0 and s["target_ce"] < s["ce/zero"]
    assert s["target/ce"] < s["target/unigram_ce"]
    assert s["n_mean_ci_tokens"] > 8 * 32 and (tmp_path / "full" / "ci_spectrum.png").exists()
    for k in ("ci_l0/blocks.1.mlp.down_proj", "ci_l0_layer/0", "n_alive_mean_ci/blocks.0.attn.q", "n_alive/blocks.0.attn.v"):
        assert k in s, k

    # the component browser of the finished run (harvest over the held-out plays, tokens decoded)
    import experiments
    from spdjax.interpret import store
    from spdjax.interpret.workflow import report_workdir

    cfg = load_config_file(CONFIG, "smoke")
    cfg.update_from_flattened_dict(SHORT)
    page = report_workdir(cfg, tmp_path / "full", experiments.builder(cache), {"n_rows": 1024}, log=lambda s: None)
    h = store.read(tmp_path / "full" / "harvest" / "harvest.sqlite")
    assert h["meta"]["input_kind"] == "tokens" and h["meta"]["n_rows"] >= 1024 and page.stat().st_size > 0
    alive = [c for c in h["components"] if c["n_active"]]
    assert alive and all(c["tokens"]["input"] and c["examples"]["top"] for c in alive)
    assert any(e["attention"] for c in alive if ".attn." in c["site"] for e in c["examples"]["top"])

    wd = tmp_path / "killed"
    killed = fault_session(wd, cache, "log:4", CONFIG, "smoke", SHORT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [r["step"] for r in jsonl_records(wd / "metrics.jsonl")] == [2, 4]
    resumed = fault_session(wd, cache, "", CONFIG, "smoke", SHORT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = saved_params(tmp_path / "full"), saved_params(wd)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert jsonl_records(wd / "metrics.jsonl") == jsonl_records(tmp_path / "full" / "metrics.jsonl")


def test_a_span_of_layers_is_decomposed_and_the_others_run_frozen():
    """`configs/lm.py:layers=1`: only block 1's six matrices are sites; zeroing every mask of the span
    gives exactly the target with block 1's kernels set to 0 (block 0 and the rest run their own weights)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import spdjax
    from experiments.lm.model import LlamaLM
    from experiments.lm.train_target import LMTargetConfig, zero_ablated
    from spdjax.losses import masked_forward
    from spdjax.masks import SiteMask

    root = CONFIG
    cfg = load_config_file(root, "smoke,layers=1")
    assert [p for p, _ in cfg.sites] == ["blocks.1.attn.*", "blocks.1.mlp.*"]
    assert [p for p, _ in load_config_file(root, "llama3_8b,layers=8-11").sites][::2] == [
        f"blocks.{i}.attn.*" for i in range(8, 12)]
    for bad in ("layers=2", "layers=1-0", "layers=x"):
        with pytest.raises(ValueError, match="layers="):
            load_config_file(root, f"smoke,{bad}")
    tcfg = LMTargetConfig(**{k: v for k, v in cfg.target.items()})
    model = LlamaLM(tcfg.shape, rngs=nnx.Rngs(0))
    target = spdjax.from_nnx(model, sites=dict(cfg.sites))
    assert sorted(s.name for s in target.sites) == sorted(
        f"blocks.1.{m}" for m in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.c_fc", "mlp.down_proj"))
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, tcfg.vocab_size)
    params = spdjax.init_decomposition(jax.random.key(1), target, ci_type="shared_mlp", ci_hidden=(8,))
    zero = {s.name: SiteMask(jnp.zeros((2, 9, s.C)), None) for s in target.sites}
    got = masked_forward(params, target, tokens, zero)
    ablated = zero_ablated(model)  # both blocks zeroed; put block 0 back
    ablated.blocks[0] = model.blocks[0]
    np.testing.assert_allclose(got, ablated(tokens), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, zero_ablated(model)(tokens), atol=1e-3)
