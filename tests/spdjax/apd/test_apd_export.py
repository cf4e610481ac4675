"""The saved APD decomposition (spdjax.apd.export): round trip, checksums, shapes, field types, and
format_version 1 files (no checksums) still loading. (Named apart from tests/spdjax/test_export.py:
test modules need distinct basenames.)"""

import json

import jax
import pytest
from flax import nnx
from helpers import assert_trees_equal, edit_json

import spdjax
from spdjax.apd import export
from spdjax.apd.components import init_apd
from spdjax.apd.losses import APDConfig


class Tied(nnx.Module):
    def __init__(self, rngs):
        self.enc = nnx.Linear(5, 3, use_bias=False, rngs=rngs)
        self.dec = nnx.Linear(3, 5, rngs=rngs)
        self.dec.kernel[...] = self.enc.kernel[...].T

    def __call__(self, x):
        return jax.nn.relu(self.dec(self.enc(x)))


class TwoLayer(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(4, 6, rngs=rngs)
        self.down = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


def _saved(tmp_path, m=2):
    target = spdjax.from_nnx(TwoLayer(nnx.Rngs(0)), sites={"up": 3, "down": 3})
    config = APDConfig(C=4, m=m)
    params = init_apd(jax.random.key(1), target, config.C, config.m)
    d = export.save(tmp_path / "d", params, target.sites, config, extra={"note": "x"})
    return d, params


def _error(d, exc=ValueError):
    with pytest.raises(exc) as e:
        export.load(d)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def _edit_meta(d, edit):
    edit_json(d / export.META, edit)


@pytest.mark.parametrize("m", [2, None])
def test_round_trip(tmp_path, m):
    d, params = _saved(tmp_path, m)
    loaded, meta = export.load(d)
    assert_trees_equal(loaded, params)
    assert meta["format_version"] == export.FORMAT_VERSION == 2 and meta["extra"] == {"note": "x"}
    assert sorted(meta["tensors"]) == ["components/down/A", "components/down/B", "components/up/A", "components/up/B"]
    assert meta["tensors"]["components/up/A"]["shape"] == [4, 4, 2 if m else 4]


def test_tied_sites_have_no_tensors_of_their_own(tmp_path):
    target = spdjax.from_nnx(Tied(nnx.Rngs(0)), sites={"enc": 2, "dec": 2}, tied={"dec": "enc"})
    params = init_apd(jax.random.key(1), target, 3, None)
    d = export.save(tmp_path / "d", params, target.sites, APDConfig(C=3, m=None))
    loaded, _ = export.load(d)
    assert_trees_equal(loaded, params)


def test_flipped_byte_names_file_and_tensor(tmp_path):
    d, _ = _saved(tmp_path)
    f = d / export.TENSORS
    raw = bytearray(f.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start = 8 + n + json.loads(raw[8:8 + n])["components/down/B"]["data_offsets"][0]
    raw[start + 2] ^= 0x01
    f.write_bytes(bytes(raw))
    msg = _error(d)
    assert str(f) in msg and "'components/down/B'" in msg and "checksum" in msg, msg


def test_truncated_tensor_file_and_garbled_json(tmp_path):
    d, _ = _saved(tmp_path)
    f, m = d / export.TENSORS, d / export.META
    good = f.read_bytes()
    f.write_bytes(good[:-7])
    assert _error(d).startswith(f"{f}: damaged or truncated")
    f.write_bytes(good)
    m.write_text(m.read_text()[:-30])
    assert _error(d).startswith(f"{m}: damaged, not valid JSON")


def test_missing_files_and_tensors(tmp_path):
    from safetensors.numpy import load_file, save_file

    assert "not a saved APD decomposition" in _error(tmp_path, FileNotFoundError)
    d, _ = _saved(tmp_path)
    f = d / export.TENSORS
    save_file({k: v for k, v in load_file(str(f)).items() if k != "components/up/B"}, str(f))
    msg = _error(d)
    assert str(f) in msg and "'components/up/B' is missing" in msg, msg


@pytest.mark.parametrize("edit,words", [
    (lambda m: m.update(format="spdjax-decomposition"), ["is not an APD decomposition"]),
    (lambda m: m.update(format_version="2"), ["field 'format_version' must be an int >= 1, got '2' (str)"]),
    (lambda m: m.update(apd=None), ["field 'apd' must be an object"]),
    (lambda m: m["apd"].update(C="4"), ["field 'apd.C' must be an int >= 1, got '4' (str)"]),
    (lambda m: m["apd"].update(m=0), ["field 'apd.m' must be null or an int >= 1"]),
    (lambda m: m["sites"][0].update(d_in="4"), ["field 'sites[0].d_in'"]),
    (lambda m: m.update(tensors=None), ["field 'tensors' must be an object"]),
    # shapes the JSON implies that the tensors do not have
    (lambda m: m["apd"].update(C=5), ["apd.safetensors: tensor 'components/", "has shape (4, ", "implies (5, "]),
    (lambda m: m["apd"].update(m=1), ["'components/down/A' has shape (4, 6, 2); apd.json implies (4, 6, 1)"]),
    (lambda m: m["tensors"]["components/up/A"].update(dtype="float16"), ["'components/up/A' is float32[4, 4, 2]",
                                                                         "records float16[4, 4, 2]"]),
])
def test_json_errors_name_the_file_and_field(tmp_path, edit, words):
    d, _ = _saved(tmp_path)
    _edit_meta(d, edit)
    msg = _error(d)
    assert msg.startswith(str(d)), msg
    for w in words:
        assert w in msg, (w, msg)


def test_format_version_1_without_checksums_still_loads(tmp_path):
    d, params = _saved(tmp_path)

    def as_v1(meta):
        meta["format_version"] = 1
        del meta["tensors"]

    _edit_meta(d, as_v1)
    loaded, _ = export.load(d)
    assert_trees_equal(loaded, params)
    _edit_meta(d, lambda meta: meta["apd"].update(C=2))  # shapes are still checked
    assert "implies (2, " in _error(d)
