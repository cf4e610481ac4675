"""`spdjax.config.parse`: a valid run config parses; every bad input is a ValueError naming its field."""

from __future__ import annotations

import ml_collections
import pytest

from spdjax import config as config_lib
from spdjax.losses import LossConfig
from spdjax.optim import OptimConfig
from spdjax.sites import SitePattern


def valid_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.experiment = "tms"
    cfg.seed = 3
    cfg.target = ml_collections.ConfigDict({"n_features": 5, "n_hidden": 2})
    cfg.sites = (("enc", 4), ("dec", 4))
    cfg.tied = (("dec", "enc"),)
    cfg.identity = (("dec", 2),)
    cfg.ci = ml_collections.ConfigDict({"type": "mlp", "hidden": (16,)})
    cfg.loss = ml_collections.ConfigDict(
        {
            "coeffs": {
                "stochastic_recon": 1.0,
                "stochastic_recon_layerwise": 1.0,
                "importance_minimality": 3e-3,
            },
            "n_mask_samples": 2,
            "mask_type": "continuous",
            "use_delta_component": True,
            "sigmoid": "leaky_hard",
            "output_loss": "mse",
            "pnorm": 2.0,
        }
    )
    cfg.optim = ml_collections.ConfigDict(
        {
            "steps": 100,
            "lr": 1e-3,
            "schedule": "cosine",
            "warmup_frac": 0.1,
            "final_lr_frac": 0.0,
            "faithfulness_warmup_steps": 20,
        }
    )
    cfg.batch_size = 64
    cfg.eval_batch_size = 128
    cfg.log_every = 10
    return cfg


def test_valid_config_parses():
    rc = config_lib.parse(valid_config())
    assert rc.experiment == "tms" and rc.seed == 3
    assert rc.target.n_features == 5
    assert rc.sites == (SitePattern("enc", 4), SitePattern("dec", 4))
    assert rc.tied == (("dec", "enc"),)
    assert rc.identity == (SitePattern("dec", 2),)
    spd = rc.method.settings
    assert rc.method.name == "spd" and (spd.ci_type, spd.ci_hidden) == ("mlp", (16,))
    assert isinstance(spd.loss, LossConfig) and isinstance(rc.optim, OptimConfig)
    assert dict(spd.loss.coeffs) == {
        "stochastic_recon": 1.0, "stochastic_recon_layerwise": 1.0, "importance_minimality": 3e-3,
    }
    assert (spd.loss.n_mask_samples, spd.loss.pnorm, spd.loss.use_delta_component) == (2, 2.0, True)
    assert (rc.optim.steps, rc.optim.schedule, rc.optim.faithfulness_warmup_steps) == (100, "cosine", 20)
    assert (rc.batch_size, rc.eval_batch_size, rc.log_every) == (64, 128, 10)
    hash(spd.loss)  # static under jit


def test_minimal_config_gets_defaults():
    cfg = ml_collections.ConfigDict()
    cfg.experiment = "tms"
    cfg.sites = (("enc", 3),)
    cfg.optim = ml_collections.ConfigDict({"steps": 5})
    rc = config_lib.parse(cfg)
    assert rc.method.settings.loss == LossConfig()
    assert rc.mesh.data == 0  # every device by default
    assert rc.optim == OptimConfig(steps=5)
    assert rc.tied == () and rc.identity == ()
    assert rc.eval_batch_size == rc.batch_size


def _set(path: str, value):
    """Mutator: set a dotted field (creating it if new)."""

    def mutate(cfg):
        *parents, leaf = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        with node.unlocked() if hasattr(node, "unlocked") else _null():
            node[leaf] = value

    return mutate


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _delete(path: str):
    def mutate(cfg):
        *parents, leaf = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        del node[leaf]

    return mutate


BAD = [
    # (id, mutation, substrings the message must contain)
    ("unknown top-level key", _set("bogus_key", 1), ["bogus_key"]),
    ("unknown loss key", _set("loss.n_mask_sample", 2), ["loss", "n_mask_sample"]),
    ("unknown loss term", _set("loss.coeffs.stochastic_recon_typo", 1.0), ["coeffs", "stochastic_recon_typo"]),
    (
        "non-numeric coefficient",
        _set("loss.coeffs", ml_collections.ConfigDict({"stochastic_recon": "one"})),
        ["coeffs", "stochastic_recon"],
    ),
    ("C = 0", _set("sites", (("enc", 0), ("dec", 4))), ["sites", "'enc'"]),
    ("C < 0", _set("sites", (("enc", 4), ("dec", -1))), ["sites", "'dec'"]),
    ("identity C = 0", _set("identity", (("dec", 0),)), ["identity", "'dec'"]),
    ("n_mask_samples = 0", _set("loss.n_mask_samples", 0), ["n_mask_samples"]),
    ("pnorm = 0", _set("loss.pnorm", 0.0), ["pnorm"]),
    ("pnorm < 0", _set("loss.pnorm", -1.0), ["pnorm"]),
    ("unknown ci type", _set("ci.type", "transformer"), ["ci.type", "transformer"]),
    ("unknown ci key", _set("ci.width", 3), ["ci", "width"]),
    ("bad ci hidden", _set("ci.hidden", (16, 0)), ["ci.hidden"]),
    ("unknown sigmoid", _set("loss.sigmoid", "tanh"), ["sigmoid", "tanh"]),
    ("unknown mask_type", _set("loss.mask_type", "gaussian"), ["mask_type", "gaussian"]),
    ("unknown output_loss", _set("loss.output_loss", "l1"), ["output_loss", "l1"]),
    ("unknown schedule", _set("optim.schedule", "exponential"), ["schedule", "exponential"]),
    ("unknown optim key", _set("optim.learning_rate", 1e-3), ["optim", "learning_rate"]),
    ("missing optim.steps", _delete("optim.steps"), ["optim", "steps"]),
    ("lr = 0", _set("optim.lr", 0.0), ["lr"]),
    ("warmup_frac > 1", _set("optim.warmup_frac", 1.5), ["warmup_frac"]),
    ("clip <= 0", _set("optim.clip_ci", -1.0), ["clip_ci"]),
    # a negative final fraction makes the LR negative (gradient ascent) at the end of the schedule
    ("final_lr_frac < 0", _set("optim.final_lr_frac", -0.5), ["final_lr_frac"]),
    ("faithfulness_warmup_lr <= 0", _set("optim.faithfulness_warmup_lr", 0.0), ["faithfulness_warmup_lr"]),
    ("batch_size = 0", _set("batch_size", 0), ["batch_size"]),
    ("eval_batch_size = 0", _set("eval_batch_size", 0), ["eval_batch_size"]),
    ("log_every = 0", _set("log_every", 0), ["log_every"]),
]


@pytest.mark.parametrize("mutate, needles", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_is_a_value_error_naming_the_field(mutate, needles):
    cfg = valid_config()
    mutate(cfg)
    with pytest.raises(ValueError) as e:
        config_lib.parse(cfg)
    msg = str(e.value)
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("field", ["experiment", "sites"])
def test_missing_required_field_is_a_value_error_naming_it(field):
    cfg = valid_config()
    del cfg[field]
    with pytest.raises(ValueError, match=field):
        config_lib.parse(cfg)


def test_load_config_file(tmp_path):
    """`path[:arg]` loads like `--config=path[:arg]`; bad paths and double arguments are errors."""
    f = tmp_path / "cfg.py"
    f.write_text(
        "import ml_collections\n"
        "def get_config(arg=None):\n"
        "    return ml_collections.ConfigDict({'arg': arg or 'default'})\n"
    )
    assert config_lib.load_config_file(f).arg == "default"
    assert config_lib.load_config_file(f"{f}:2,smoke").arg == "2,smoke"
    assert config_lib.load_config_file(f, "smoke").arg == "smoke"
    with pytest.raises(ValueError, match="argument once"):
        config_lib.load_config_file(f"{f}:2", "smoke")
    with pytest.raises(FileNotFoundError, match="not found"):
        config_lib.load_config_file(tmp_path / "missing.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="no get_config"):
        config_lib.load_config_file(tmp_path / "empty.py")


def test_parse_arg_flags_choices_and_named_values():
    from spdjax.config import parse_arg

    a = parse_arg("2, smoke,layers=3-5", "x", ("smoke", "paper"), named=("layers",), n=("1", "2"))
    assert (a.smoke, a.paper, a.n, a.layers) == (True, False, "2", "3-5")
    b = parse_arg(None, "x", ("smoke",), named=("layers",), n=("1", "2"))
    assert (b.smoke, b.n, b.layers) == (False, "1", None)
    for bad, msg in (("3", "unknown argument '3'"), ("1,2", "at most one value"), ("layers=", "needs one"),
                     ("layers=1,layers=2", "needs one"), ("depth=2", "unknown argument")):
        with pytest.raises(ValueError, match=msg):
            parse_arg(bad, "x", ("smoke",), named=("layers",), n=("1", "2"))
