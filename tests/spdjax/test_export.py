"""Export / load round trip of a decomposition (safetensors + JSON)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import edit_json

import spdjax
from spdjax import export


class Tied(nnx.Module):
    def __init__(self, rngs):
        self.enc = nnx.Linear(5, 2, use_bias=False, rngs=rngs)
        self.dec = nnx.Linear(2, 5, rngs=rngs)
        self.dec.kernel[...] = self.enc.kernel[...].T

    def __call__(self, x):
        return jax.nn.relu(self.dec(self.enc(x)))


@pytest.mark.parametrize("ci_type,hidden", [("mlp", (4,)), ("shared_mlp", (3, 2))])
def test_round_trip(tmp_path, ci_type, hidden):
    target = spdjax.from_nnx(Tied(nnx.Rngs(0)), sites={"enc": 6, "dec": 6}, tied={"dec": "enc"},
                             identity={"dec": 3})
    params = spdjax.init_decomposition(jax.random.key(1), target, ci_type, hidden)
    export.save(tmp_path / "d", params, target.sites, ci_type, hidden, extra={"note": "x"})
    meta = json.loads((tmp_path / "d" / export.META).read_text())
    assert meta["format"] == export.FORMAT and meta["spdjax_version"] == spdjax.__version__
    dec = spdjax.load(tmp_path / "d")
    assert dec.sites == target.sites and dec.ci_type == ci_type and dec.ci_hidden == hidden
    assert dec.extra == {"note": "x"}
    assert jax.tree.structure(dec.params) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(dec.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = jnp.linspace(0, 1, 20).reshape(4, 5)
    l1, _ = spdjax.loss_fn(params, target, x, jax.random.key(0))
    l2, _ = spdjax.loss_fn(dec.params, target, x, jax.random.key(0))
    assert float(l1) == float(l2)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved spdjax decomposition"):
        spdjax.load(tmp_path)
    (tmp_path / export.META).write_text(json.dumps({"format": "other"}))
    (tmp_path / export.TENSORS).write_bytes(b"")
    with pytest.raises(ValueError, match="format"):
        spdjax.load(tmp_path)


# ----------------------------------------------------------------------------- damaged or inconsistent files


def _saved(tmp_path, ci_type="mlp", hidden=(4,)):
    target = spdjax.from_nnx(Tied(nnx.Rngs(0)), sites={"enc": 6, "dec": 6}, tied={"dec": "enc"})
    params = spdjax.init_decomposition(jax.random.key(1), target, ci_type, hidden)
    d = export.save(tmp_path / "d", params, target.sites, ci_type, hidden)
    return d, params


def _error(path, exc=ValueError):
    with pytest.raises(exc) as e:
        spdjax.load(path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def _edit_meta(d, edit):
    edit_json(d / export.META, edit)


def _site(meta, name):
    return next(s for s in meta["sites"] if s["name"] == name)


def _data_offset(raw: bytes, name: str) -> int:
    """Where tensor `name`'s bytes start in a safetensors file."""
    n = int.from_bytes(raw[:8], "little")
    return 8 + n + json.loads(raw[8:8 + n])[name]["data_offsets"][0]


def test_saved_json_records_every_tensor(tmp_path):
    d, params = _saved(tmp_path)
    meta = json.loads((d / export.META).read_text())
    assert meta["format_version"] == export.FORMAT_VERSION == 2
    flat = export.flatten_params(params)
    assert sorted(meta["tensors"]) == sorted(flat)
    rec = meta["tensors"]["components/enc/V"]
    assert rec["dtype"] == "float32" and rec["shape"] == [5, 6] and len(rec["sha256"]) == 64


@pytest.mark.parametrize("name", ["components/enc/V", "ci/dec/weights/1"])
def test_flipped_byte_in_tensor_data_names_file_and_tensor(tmp_path, name):
    d, _ = _saved(tmp_path)
    f = d / export.TENSORS
    raw = bytearray(f.read_bytes())
    raw[_data_offset(bytes(raw), name) + 1] ^= 0x01  # a low mantissa bit: still a finite float
    f.write_bytes(bytes(raw))
    msg = _error(d)
    assert str(f) in msg and repr(name) in msg and "checksum" in msg, msg


def test_truncated_and_garbled_tensor_file(tmp_path):
    d, _ = _saved(tmp_path)
    f = d / export.TENSORS
    raw = f.read_bytes()
    for damaged in (raw[:-10], raw[:20], b"", b"\x00" * 100):
        f.write_bytes(damaged)
        msg = _error(d)
        assert msg.startswith(f"{f}: damaged or truncated"), msg


def test_missing_and_unexpected_tensors(tmp_path):
    from safetensors.numpy import load_file, save_file

    d, _ = _saved(tmp_path)
    f = d / export.TENSORS
    tensors = load_file(str(f))
    save_file({k: v for k, v in tensors.items() if k != "ci/enc/biases/0"}, str(f))
    msg = _error(d)
    assert str(f) in msg and "'ci/enc/biases/0' is missing" in msg, msg
    save_file({**tensors, "components/dec/V": tensors["components/enc/V"]}, str(f))
    msg = _error(d)
    assert str(f) in msg and "unexpected tensor 'components/dec/V'" in msg, msg


def test_shapes_are_checked_against_the_sites_and_the_records(tmp_path):
    d, _ = _saved(tmp_path)
    f, m = d / export.TENSORS, d / export.META
    good = m.read_text()

    def site_C(meta):
        _site(meta, "enc")["C"] = 7

    _edit_meta(d, site_C)
    msg = _error(d)
    assert str(f) in msg and "'components/enc/V' has shape (5, 6)" in msg and "implies (5, 7)" in msg, msg

    m.write_text(good)

    def record_shape(meta):
        meta["tensors"]["components/enc/U"]["shape"] = [6, 4]

    _edit_meta(d, record_shape)
    msg = _error(d)
    assert str(f) in msg and "'components/enc/U'" in msg and "records float32[6, 4]" in msg, msg

    m.write_text(good)

    def hidden(meta):
        meta["ci_hidden"] = [3]

    _edit_meta(d, hidden)  # the CI weights then have the wrong shape (caught before any checksum)
    msg = _error(d)
    assert str(f) in msg and "'ci/dec/weights/0' has shape (6, 1, 4)" in msg and "implies (6, 1, 3)" in msg, msg


@pytest.mark.parametrize("edit,words", [
    (lambda m: m.update(format_version="2"), ["field 'format_version' must be an int >= 1, got '2' (str)"]),
    (lambda m: m.update(format_version=True), ["field 'format_version'", "(bool)"]),
    (lambda m: m.update(format_version=99), ["format_version 99 is newer"]),
    (lambda m: m.update(ci_type=3), ["field 'ci_type' must be one of", "got 3 (int)"]),
    (lambda m: m.update(ci_type="rnn"), ["field 'ci_type'", "'rnn'"]),
    (lambda m: m.update(ci_hidden=["4"]), ["field 'ci_hidden' must be a list of ints >= 1"]),
    (lambda m: m.update(ci_hidden=4), ["field 'ci_hidden'", "(int)"]),
    (lambda m: m.update(sites={}), ["field 'sites' must be a non-empty list"]),
    (lambda m: m.update(sites=[]), ["field 'sites' must be a non-empty list"]),
    # sites: [dec (tied to enc), enc]
    (lambda m: m["sites"].__setitem__(0, "dec"), ["field 'sites[0]' must be an object"]),
    (lambda m: m["sites"][0].pop("d_in"), ["field 'sites[0]' must have the keys", "missing ['d_in']"]),
    (lambda m: m["sites"][0].update(color=1), ["field 'sites[0]'", "unknown ['color']"]),
    (lambda m: m["sites"][0].update(C="6"), ["field 'sites[0].C' must be an int >= 1, got '6' (str)"]),
    (lambda m: m["sites"][1].update(in_shape=[2.0]), ["field 'sites[1].in_shape' must be a list of ints"]),
    (lambda m: m["sites"][1].update(kind="conv"), ["field 'sites[1].kind'", "'conv'"]),
    (lambda m: m["sites"][0].update(tied_to="nope"), ["field 'sites[0].tied_to'", "['enc']"]),
    (lambda m: m["sites"][0].update(name="enc"), ["'enc' is listed twice"]),
    (lambda m: m.update(extra=[]), ["field 'extra' must be an object"]),
    (lambda m: m.update(tensors=[]), ["field 'tensors' must be an object"]),
    (lambda m: m["tensors"].pop("ci/dec/biases/0"), ["field 'tensors' has no record of tensor 'ci/dec/biases/0'"]),
    (lambda m: m["tensors"]["components/enc/V"].update(sha256="x"), ["field 'tensors[\"components/enc/V\"].sha256' must be 64"]),
    (lambda m: m["tensors"]["components/enc/V"].pop("dtype"), ["field 'tensors[\"components/enc/V\"]' must be", "keys"]),
])
def test_json_field_types(tmp_path, edit, words):
    d, _ = _saved(tmp_path)
    _edit_meta(d, edit)
    msg = _error(d)
    assert msg.startswith(str(d)), msg
    for w in words:
        assert w in msg, (w, msg)


def test_garbled_json(tmp_path):
    d, _ = _saved(tmp_path)
    m = d / export.META
    raw = m.read_bytes()
    for damaged in (raw[: len(raw) // 2], b"\xff\xfe" + raw, b"[1, 2]"):
        m.write_bytes(damaged)
        msg = _error(d)
        assert msg.startswith(f"{m}: damaged"), msg


def test_format_version_1_without_checksums_still_loads(tmp_path):
    d, params = _saved(tmp_path, "shared_mlp", (3, 2))

    def as_v1(meta):
        meta["format_version"] = 1
        del meta["tensors"]

    _edit_meta(d, as_v1)
    dec = spdjax.load(d)
    for a, b in zip(jax.tree.leaves(dec.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # without checksums the shapes are still checked against the sites
    _edit_meta(d, lambda meta: _site(meta, "enc").update(d_in=4))
    msg = _error(d)
    assert str(d / export.TENSORS) in msg and "'components/enc/V' has shape (5, 6)" in msg, msg
