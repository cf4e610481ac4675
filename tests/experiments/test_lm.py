"""configs/lm.py:smoke through the runner: corpus, tokenizer and a tiny target built and cached, the six
matrices of both layers decomposed from the host-side iterator, and the LM evaluation keys."""

from pathlib import Path

from helpers import run_config

from spdjax.config import load_config_file


def test_smoke_run_end_to_end(tmp_path):
    cfg = load_config_file(Path(__file__).resolve().parents[2] / "configs" / "lm.py", "smoke")
    s = run_config(cfg, tmp_path / "run", tmp_path / "cache", quiet=True)
    assert s["steps"] == 4 and "final/loss/pgd_recon_subset" in s
    for m in ("unmasked", "ci", "rounded", "stochastic", "random", "zero"):
        assert s[f"ce/{m}"] > 0 and s[f"kl/{m}"] >= 0, m
    assert s["ce_unrecovered/zero"] == 1.0 and s["target_ce"] < s["ce/zero"]
    assert s["target/ce"] < s["target/unigram_ce"]
    assert s["n_mean_ci_tokens"] > 8 * 32 and (tmp_path / "run" / "ci_spectrum.png").exists()
    for k in ("ci_l0/blocks.1.mlp.down_proj", "ci_l0_layer/0", "n_alive_mean_ci/blocks.0.attn.q", "n_alive/blocks.0.attn.v"):
        assert k in s, k
