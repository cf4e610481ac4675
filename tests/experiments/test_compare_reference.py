"""experiments.compare_reference without the reference installed: its cases name real configs, and a
missing reference or target is a one-line error naming what to run."""

from pathlib import Path

import pytest

from experiments import compare_reference as cr
from spdjax.config import load_config_file, parse

ROOT = Path(__file__).resolve().parents[2]


def test_cases_name_configs_that_parse():
    for case, (exp, _, config, ref_steps, our_steps) in cr.CASES.items():
        assert exp in ("tms", "resid1", "resid2") and ref_steps > 10 and our_steps > 5, case
        parse(load_config_file(ROOT / config))


def test_missing_reference_pieces_are_clear_errors(tmp_path):
    (tmp_path / "out" / "tms").mkdir(parents=True)
    with pytest.raises(SystemExit, match="run setup-reference.sh"):
        cr.reference_target(tmp_path, "resid1")
    (tmp_path / "out" / "tms" / "tms.pth").write_bytes(b"")
    assert cr.reference_target(tmp_path, "tms") == tmp_path / "out" / "tms" / "tms.pth"
    with pytest.raises(SystemExit, match="only"):
        cr._pin(10_000)
