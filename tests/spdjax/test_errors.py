"""Bad input gives a one-line error naming the field (and the allowed values), before any compilation."""

import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import spdjax
from spdjax.experiment import Experiment
from spdjax.runner import check_batch

ROOT = Path(__file__).resolve().parents[2]

CASES = [
    ("--config.foo=1", "unknown config field 'foo'"),
    ("--config.loss.bogus=1", "unknown config field 'bogus'"),
    ("--config.optim.lr=abc", "could not convert string to float: 'abc'"),
    ("--config.loss.n_mask_samples=0", "loss.n_mask_samples must be an int >= 1, got 0"),
    ("--config.loss.terms.importance_minimality.pnorm=0.0", "loss.terms.importance_minimality.pnorm must be > 0"),
    ("--config.ci.type=foo", "config.ci.type: unknown CI function 'foo'; allowed: ['mlp', 'vector_mlp', 'shared_mlp']"),
    ("--config.loss.sigmoid=tanh", "sigmoid: unknown sigmoid 'tanh'; allowed:"),
    ("--config.loss.output_loss=l1", "loss.output_loss: unknown 'l1'; allowed: ['mse', 'kl']"),
    ("--config.optim.schedule=exp", "optim.schedule: unknown 'exp'; allowed:"),
    ("--config.target.weights_path=/nonexistent/w.npz", "config.target.weights_path: target file '/nonexistent/w.npz' does not exist"),
]


CASES += [
    ("--config.method=apd", "config: unknown field(s) ['ci', 'loss'] for method 'apd' (['ci', 'loss'] belong to another method)"),
    ("--config.experiment=nope", "config.experiment: unknown family 'nope'; allowed: ['ih', 'lm', 'resid_mlp', 'sparse_linear', 'tms']"),
    ("--config.precision.compute_dtype=int8", "config.precision.compute_dtype: unknown 'int8'"),
    ("--config.mesh.data=-2", "config.mesh.data must be 0 (auto), -1 (all remaining devices) or an int >= 1, got -2"),
    ("--config.loss.terms.stochastic_recon.n_steps=2", "unknown config field 'n_steps'"),
    (":paper,papr", "ValueError: configs/tms_5-2.py: unknown argument 'papr'; allowed: paper, smoke"),
    ("--config.loss.terms.stochastic_recon.coeff=-1.0",
     "config.loss.terms.stochastic_recon.coeff must be finite and >= 0, got -1.0"),
    ("--config.loss.terms.importance_minimality.coeff=nan",
     "config.loss.terms.importance_minimality.coeff must be finite and >= 0, got nan"),
    ("--harvest.foo=1", "unknown --harvest.foo; allowed: ['n_coactive',"),
    ("--cluster.alpha=x", "could not convert string to float: 'x'"),
]


@pytest.mark.parametrize("override,message", CASES, ids=[c[0] for c in CASES])
def test_launch_one_line_errors(tmp_path, override, message):
    arg, extra = (override[1:], []) if override.startswith(":") else ("smoke", [override])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), f"--config={ROOT / 'configs' / 'tms_5-2.py'}:{arg}",
         f"--workdir={tmp_path / 'wd'}", f"--cache_dir={tmp_path / 'cache'}", "--quiet", *extra],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert not (tmp_path / "cache").exists()  # refused before the target was trained


@pytest.mark.parametrize("args,message", [
    (["--mode=cluster"], "decomposition does not exist: clustering needs a finished run's workdir"),
    (["--mode=harvest"], "decomposition does not exist: the harvest needs a finished run's workdir"),
    (["--mode=report"], "decomposition does not exist: the harvest needs a finished run's workdir"),
    (["--mode=cluster", "--cluster.sampler=nope"], "clustering sampler: unknown 'nope'; allowed:"),
    (["--mode=report", "--harvest.n_rows=0"], "harvest.n_rows must be >= 1, got 0"),
])
def test_modes_on_a_finished_run_refuse_bad_input_in_one_line(tmp_path, args, message):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), f"--config={ROOT / 'configs' / 'tms_5-2.py'}:smoke",
         f"--workdir={tmp_path / 'wd'}", f"--cache_dir={tmp_path / 'cache'}", *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr[-2000:]


@pytest.mark.parametrize("args,message", [
    (["--config=configs/nope.py"], "error: config file not found: configs/nope.py"),
    (["--config=configs/nope.py:smoke", "--config.optim.steps=3"], "error: config file not found: configs/nope.py"),
    (["--config", "configs/nope.py"], "error: config file not found: configs/nope.py"),
    (["--config=configs"], "error: config file is a directory, not a .py file: configs"),
    (["--config=configs/:smoke"], "error: config file is a directory, not a .py file: configs/"),
    (["--config="], "error: --config: the config file path is empty"),
])
def test_launch_config_file_that_cannot_be_loaded(tmp_path, args, message):
    """A missing or directory config path is one line (ml_collections defers the error to the config's
    first use and prints a traceback)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args, f"--workdir={tmp_path / 'wd'}", f"--cache_dir={tmp_path / 'c'}"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 1
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [message], proc.stderr[-2000:]
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("override", [[], ["--config.foo=1"]])
def test_launch_config_file_whose_loading_fails_with_an_oserror(tmp_path, override):
    """An OSError inside get_config: ml_collections defers it too; the message is its last line."""
    cfg = tmp_path / "reads_missing.py"
    cfg.write_text(f"def get_config():\n    return open({str(tmp_path / 'missing.txt')!r})\n")
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), f"--config={cfg}", *override],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [
        f"error: config file {cfg}: [Errno 2] No such file or directory: '{tmp_path / 'missing.txt'}'"
    ], proc.stderr[-2000:]


class Model(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc(x)


def test_batch_that_does_not_fit_the_target():
    target = spdjax.from_nnx(Model(nnx.Rngs(0)), {"fc": 2})
    good = Experiment(target, lambda k: jnp.zeros((8, 4)), analyze=None)
    check_batch(good)
    bad = Experiment(target, lambda k: jnp.zeros((8, 5)), analyze=None)
    with pytest.raises(ValueError, match=r"batch float32\[8, 5\] does not fit the target: .*") as e:
        check_batch(bad)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- library-level errors


class TwoLayer(nnx.Module):
    def __init__(self, rngs, d_in=8, dtype=jnp.float32):
        self.inp = nnx.Linear(d_in, 4, rngs=rngs, param_dtype=dtype)
        self.head = nnx.Linear(4, 3, rngs=rngs, param_dtype=dtype)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.inp(x)))


SITES_CASES = [
    (["inp", "head"], TypeError,
     "sites must be {pattern: C} or ((pattern, C), ...) with C the number of subcomponents, "
     "e.g. {'inp': 100, 'head': 100}; got a list of str ['inp', 'head']"),
    ("inp", TypeError, "got a str 'inp'"),
    (None, TypeError, "got None"),
    ([("inp",)], TypeError, "got the entry ('inp',) (no C)"),
    ([("inp", 2, 3)], TypeError, "got the entry ('inp', 2, 3)"),
    ([(3, 2)], TypeError, "got the pattern 3 (a int, not a str)"),
    ({"inp": "4"}, ValueError, "sites: C for pattern 'inp' must be a positive int (the number of subcomponents), got '4'"),
    ({"inp": 2.0}, ValueError, "must be a positive int (the number of subcomponents), got 2.0"),
    ({"inp": 0}, ValueError, "must be a positive int (the number of subcomponents), got 0"),
    ({"inp": True}, ValueError, "got True"),
    ({}, ValueError, "sites: at least one site pattern is required"),
]


@pytest.mark.parametrize("sites,exc,message", SITES_CASES, ids=[repr(c[0]) for c in SITES_CASES])
def test_malformed_sites_say_what_was_expected(sites, exc, message):
    with pytest.raises(exc) as e:
        spdjax.from_nnx(TwoLayer(nnx.Rngs(0)), sites=sites)
    assert message in str(e.value) and "\n" not in str(e.value)
    if exc is TypeError:
        assert "SitePattern.__init__" not in str(e.value)
    with pytest.raises(exc, match="sites"):  # the pure-function adapter says the same
        spdjax.from_apply(lambda p, x: x @ p["inp"], {"inp": jnp.zeros((8, 4))}, sites=sites)


def test_malformed_identity_names_the_identity_argument():
    with pytest.raises(TypeError, match=r"^identity must be \{pattern: C\}.*got a list of str \['head'\]$"):
        spdjax.from_nnx(TwoLayer(nnx.Rngs(0)), sites={"inp": 2}, identity=["head"])


def _pure_apply(p, x):
    from spdjax.targets import linear

    return linear("head", jax.nn.relu(linear("inp", x, p["inp"])), p["head"])


def test_batch_of_the_wrong_width_names_the_site():
    """(64, 4, 7) into a model whose first Linear takes 8 features: one line naming the site, the shape
    it expects and the one it got, in the plain forward, in loss_fn (jitted or not), for both adapters
    and for an identity site in front of the layer."""
    x, key = jnp.ones((64, 4, 7)), jax.random.key(0)
    msg = r"site 'inp' expects inputs of shape \(\.\.\., 8\), got float32\[64, 4, 7\]"
    pure = spdjax.from_apply(_pure_apply, {"inp": jnp.zeros((8, 4)), "head": jnp.zeros((4, 3))}, {"inp": 2})
    for target in (spdjax.from_nnx(TwoLayer(nnx.Rngs(0)), {"inp": 2, "head": 2}), pure):
        params = spdjax.init_decomposition(key, target)
        for call in (lambda: target(x), lambda: spdjax.loss_fn(params, target, x, key),
                     lambda: jax.jit(spdjax.loss_fn)(params, target, x, key)):
            with pytest.raises(ValueError) as e:
                call()
            assert re.fullmatch(msg, str(e.value)), str(e.value)  # (under jit, JAX adds a __notes__ entry)
        assert target(jnp.ones((64, 4, 8))).shape == (64, 4, 3)  # any leading axes are fine
    with_id = spdjax.from_nnx(TwoLayer(nnx.Rngs(0)), {"head": 2}, identity={"inp": 3})
    with pytest.raises(ValueError, match=r"^site 'inp.pre_identity' expects inputs of shape \(\.\.\., 8\), got "):
        with_id(x)
    with pytest.raises(ValueError, match=r"^site 'inp' expects inputs of shape \(\.\.\., 8\), got float32\[5\]$"):
        spdjax.from_nnx(TwoLayer(nnx.Rngs(0)), {"inp": 2})(jnp.ones(5))


def test_params_made_for_another_target():
    from spdjax.decomposition import check_params

    key, x = jax.random.key(0), jnp.ones((2, 8))
    a = spdjax.from_nnx(TwoLayer(nnx.Rngs(0)), {"inp": 3, "head": 3})
    b = spdjax.from_nnx(TwoLayer(nnx.Rngs(0)), {"inp": 3})
    c = spdjax.from_nnx(TwoLayer(nnx.Rngs(0), d_in=5), {"inp": 3, "head": 3})
    pa, pb = spdjax.init_decomposition(key, a), spdjax.init_decomposition(key, b)
    check_params(pa, a)
    with pytest.raises(ValueError, match=r"^params do not fit the target .*: no components for site\(s\) \['head'\]; "
                                         r"no ci for site\(s\) \['head'\]$"):
        spdjax.loss_fn(pb, a, x, key)
    with pytest.raises(ValueError, match=r"components for site\(s\) \['head'\] that the target does not have"):
        jax.jit(spdjax.loss_fn)(pa, b, x, key)
    with pytest.raises(ValueError, match=r"'inp': V \(8, 3\) and U \(3, 4\), the site needs V \(d_in, C\) = \(5, 3\)") as e:
        spdjax.loss_fn(pa, c, jnp.ones((2, 5)), key)
    assert "\n" not in str(e.value)
    # CI functions on the site input (vector_mlp / shared_mlp) of another width, or another C
    for ci_type in ("vector_mlp", "shared_mlp"):
        pc = spdjax.init_decomposition(key, c, ci_type)
        mixed = spdjax.SPDParams(spdjax.init_decomposition(key, a, ci_type).components, pc.ci)
        with pytest.raises(ValueError, match=rf"ci 'inp' \({ci_type}\): input width 5, the site needs 8"):
            check_params(mixed, a)
    other_C = spdjax.from_nnx(TwoLayer(nnx.Rngs(0)), {"inp": 4, "head": 3})
    with pytest.raises(ValueError, match=r"ci 'inp' \(mlp\): C = 3, the site has C = 4"):
        check_params(pa, other_C)
    with pytest.raises(TypeError, match="params must be SPDParams"):
        check_params({"inp": None}, a)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_exported_files_follow_the_umask(tmp_path, umask, mode):
    import os
    import stat

    from spdjax import export
    from spdjax.apd import export as apd_export
    from spdjax.apd.components import init_apd
    from spdjax.apd.losses import APDConfig

    target = spdjax.from_nnx(TwoLayer(nnx.Rngs(0)), {"inp": 3, "head": 3})
    old = os.umask(umask)
    try:
        export.save(tmp_path / "spd", spdjax.init_decomposition(jax.random.key(0), target), target.sites, "mlp", (16,))
        apd_export.save(tmp_path / "apd", init_apd(jax.random.key(0), target, 3, 2), target.sites, APDConfig(C=3, m=2))
    finally:
        os.umask(old)
    files = sorted((tmp_path / "spd").iterdir()) + sorted((tmp_path / "apd").iterdir())
    assert [f.name for f in files] == ["decomposition.json", "decomposition.safetensors", "apd.json", "apd.safetensors"]
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: oct(mode) for f in files}


def test_identity_kernel_has_the_layer_dtype():
    model = TwoLayer(nnx.Rngs(0), dtype=jnp.bfloat16)
    target = spdjax.from_nnx(model, {"inp": 3}, identity={"head": 2})  # host 'head' is no site itself
    k = target.kernels()
    assert k["head.pre_identity"].dtype == jnp.bfloat16 and k["inp"].dtype == jnp.bfloat16
    assert (k["head.pre_identity"] == jnp.eye(4, dtype=jnp.bfloat16)).all()
    pure = spdjax.from_apply(
        _pure_apply, {"inp": jnp.zeros((8, 4), jnp.bfloat16), "head": jnp.zeros((4, 3), jnp.bfloat16)},
        {"inp": 3}, identity={"inp": 2, "head": 2},
    )
    assert {n: v.dtype for n, v in pure.kernels().items()} == {
        "inp.pre_identity": jnp.bfloat16, "inp": jnp.bfloat16, "head.pre_identity": jnp.bfloat16,
    }
    params = spdjax.init_decomposition(jax.random.key(0), target)
    cfg = spdjax.LossConfig(coeffs=(("faithfulness", 1.0), ("stochastic_recon", 1.0)))
    loss, _ = jax.jit(spdjax.loss_fn)(params, target, jnp.ones((2, 8), jnp.bfloat16), jax.random.key(1), cfg)
    assert jnp.isfinite(loss)
