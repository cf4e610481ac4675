"""experiments.compare_reference without the reference installed: its cases name real configs, and a
missing reference or target is a one-line error naming what to run."""

from pathlib import Path

import pytest

from experiments import compare_reference as cr
from spdjax.config import load_config_file, parse

ROOT = Path(__file__).resolve().parents[2]


def test_cases_name_configs_that_parse():
    for case, (exp, config, ref_steps, our_steps) in cr.CASES.items():
        assert exp in ("tms", "resid1", "resid2") and ref_steps > 10 and our_steps > 5, case
        parse(load_config_file(ROOT / config))


def test_reference_targets_found_by_their_train_config_and_missing_ones_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="run setup-reference.sh"):
        cr.reference_target(tmp_path, "tms")
    for run, name, layers in (("t-1", "tms", None), ("t-2", "resid_mlp", 1), ("t-3", "resid_mlp", 2)):
        d = tmp_path / "out" / "train" / run
        d.mkdir(parents=True)
        (d / f"{name}.pth").write_bytes(b"")
        (d / f"{name}_train_config.yaml").write_text(
            "seed: 0\n" if layers is None else f"resid_mlp_model_config:\n  n_features: 100\n  n_layers: {layers}\n")
    assert cr.reference_target(tmp_path, "tms").parent.name == "t-1"
    assert cr.reference_target(tmp_path, "resid1").parent.name == "t-2"
    assert cr.reference_target(tmp_path, "resid2").parent.name == "t-3"
    with pytest.raises(SystemExit, match="only"):
        cr._pin(10_000)
