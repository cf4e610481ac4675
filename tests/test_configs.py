"""Every shipped config file and documented variant parses; APD configs decompose the same cached
targets as their SPD counterparts (identical target sections)."""

from pathlib import Path

import pytest

from spdjax.config import load_config_file, parse

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "tms_5-2": ["", "smoke", "paper", "paper,smoke"],
    "tms_5-2_id": ["", "smoke", "paper"],
    "tms_40-10": ["", "smoke", "paper"],
    "tms_40-10_id": ["", "smoke", "paper", "reference", "reference,smoke"],
    "resid_mlp": ["", "1", "2", "3", "smoke", "2,smoke", "3,smoke", "1,paper", "2,paper", "3,paper,smoke"],
    "resid_mlp2_reference": ["", "smoke"],
    "apd_tms_5-2": ["", "smoke"],
    "apd_tms_40-10": ["", "smoke"],
    "apd_resid_mlp": ["", "1", "2", "smoke", "2,smoke", "1,tuned", "1,tuned,smoke"],
    "sparse_linear": ["", "smoke"],
    "ih": ["", "smoke", "reference"],
    "lm": ["", "smoke", "1b", "llama3_8b"],
}
CASES = [(n, a) for n, args in VARIANTS.items() for a in args]


def test_every_config_file_is_listed():
    assert {p.stem for p in (ROOT / "configs").glob("*.py")} == set(VARIANTS)


@pytest.mark.parametrize("name,arg", CASES, ids=[f"{n}:{a}" for n, a in CASES])
def test_config_parses(name, arg):
    rc = parse(load_config_file(ROOT / "configs" / f"{name}.py", arg or None))
    assert rc.method.name == ("apd" if name.startswith("apd_") else "spd")
    assert rc.mesh.data == 0  # every device by default
    if "smoke" in arg:
        assert rc.optim.steps <= 30


@pytest.mark.parametrize("apd,spd", [
    ("apd_tms_5-2:", "tms_5-2:"), ("apd_tms_40-10:", "tms_40-10:"), ("apd_resid_mlp:1", "resid_mlp:1"),
    ("apd_resid_mlp:2", "resid_mlp:2"), ("apd_tms_5-2:smoke", "tms_5-2:smoke"),
])
def test_apd_configs_share_the_spd_targets(apd, spd):
    def target(spec):
        name, arg = spec.split(":")
        return load_config_file(ROOT / "configs" / f"{name}.py", arg or None).target.to_dict()

    assert target(apd) == target(spd)


def test_unknown_argument_is_one_line():
    with pytest.raises(ValueError, match=r"^configs/tms_5-2.py: unknown argument 'papr'; allowed: paper, smoke$"):
        load_config_file(ROOT / "configs" / "tms_5-2.py", "papr")
    with pytest.raises(ValueError, match=r"configs/resid_mlp.py: at most one value of 'layers' \(1, 2, 3\), got '1,2'"):
        load_config_file(ROOT / "configs" / "resid_mlp.py", "1,2")
