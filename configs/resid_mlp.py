"""ResidMLP with 1, 2 or 3 layers: the SPD recipe of toy_models.md.

`--config=configs/resid_mlp.py:2` picks the layer count (default 1); append `,paper` for the SPD paper's
appendix recipe (faithfulness 1 instead of the delta component, 30k / 50k / 200k steps; e.g. `:1,paper`)
and `,smoke` (e.g. `:2,smoke`, or `:smoke` alone for 1 layer) to shrink it to run in seconds on CPU.
"""

from experiments.resid_mlp import resid_mlp_config


def get_config(arg=None):
    parts = [p.strip() for p in str(arg or "").split(",") if p.strip()]
    smoke, paper = "smoke" in parts, "paper" in parts
    rest = [p for p in parts if p not in ("smoke", "paper")]
    if len(rest) > 1 or (rest and rest[0] not in ("1", "2", "3")):
        raise ValueError(f"configs/resid_mlp.py: argument must be 1, 2 or 3 [,paper] [,smoke], got {arg!r}")
    return resid_mlp_config(int(rest[0]) if rest else 1, smoke=smoke, recipe="paper" if paper else "main")
