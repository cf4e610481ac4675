"""spdjax.cpu_tuning: the XLA flags, malloc settings and Threefry lowering spdjax applies at import.

The Threefry lowering is checked against Random123's known-answer vectors and an independent NumPy
implementation of Threefry-2x32-20, through JAX's own `threefry_2x32` and `jax.random` draws.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spdjax import cpu_tuning
from tests.helpers import SUBPROCESS_ENV


def test_xla_flags_only_for_checked_jaxlib_versions(monkeypatch):
    import os

    from spdjax import cpu_tuning

    monkeypatch.delenv("SPDJAX_NO_XLA_FLAGS", raising=False)
    monkeypatch.delenv("SPDJAX_NO_CPU_TUNING", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    cpu_tuning.apply(version=(0, 10, 1))
    flags = os.environ["XLA_FLAGS"]
    assert "--xla_dump_to=/tmp/x" in flags and "concurrency_optimized_scheduler=false" in flags
    assert "ynn_fusion_type" not in flags
    cpu_tuning.apply(version=(0, 10, 2))
    flags = os.environ["XLA_FLAGS"]
    assert flags.count("ynn_fusion_type") == 1 and flags.count("concurrency_optimized_scheduler") == 1


MALLOC_PROBE = """
import resource, threading
import numpy as np
import spdjax.cpu_tuning as t
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def churn(n):  # 128 MiB blocks: above any mmap threshold and a thread arena's 64 MiB heaps
    for i in range(n):
        a = np.ones(32 << 20, np.float32); del a
def in_thread(n):
    th = threading.Thread(target=churn, args=(n,)); th.start(); th.join()
churn(2); in_thread(2)
f0 = faults(); churn(5); f1 = faults(); in_thread(5); f2 = faults()
print(t.MALLOC_TUNED, (f1 - f0) // 5, (f2 - f1) // 5)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_tuning_reuses_big_blocks_instead_of_faulting_them_in():
    """With spdjax's malloc settings a freed 128 MiB block is reused, in the main thread and in another
    thread alike: repeated allocations cost no page faults. `SPDJAX_NO_MALLOC_TUNING=1` keeps glibc's
    default, where each one is mapped afresh and faulted in again (at least 64 faults: 128 MiB in 2 MiB
    huge pages, which numpy asks for)."""
    import subprocess

    from tests.helpers import SUBPROCESS_ENV

    def probe(**env):
        out = subprocess.run(
            [sys.executable, "-c", MALLOC_PROBE], env={**SUBPROCESS_ENV, **env}, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-2000:]
        tuned, main, thread = out.stdout.split()
        return tuned == "True", int(main), int(thread)

    tuned, main, thread = probe()
    assert tuned and main < 8 and thread < 8, (main, thread)
    tuned, main, thread = probe(SPDJAX_NO_MALLOC_TUNING="1")
    assert not tuned and main >= 64 and thread >= 64, (main, thread)



def _threefry_numpy(key, x):
    """Threefry-2x32 with 20 rounds in NumPy uint32 arithmetic (Salmon et al. 2011)."""
    k = [np.uint32(key[0]), np.uint32(key[1])]
    ks = [k[0], k[1], k[0] ^ k[1] ^ np.uint32(0x1BD11BDA)]
    a, b = (np.asarray(v, np.uint32).copy() for v in x)
    rot = [(13, 15, 26, 6), (17, 29, 16, 24)]
    with np.errstate(over="ignore"):
        a, b = a + ks[0], b + ks[1]
        for j in range(1, 6):
            for d in rot[(j - 1) % 2]:
                a = a + b
                b = ((b << np.uint32(d)) | (b >> np.uint32(32 - d))) ^ a
            a, b = a + ks[j % 3], b + ks[(j + 1) % 3] + np.uint32(j)
    return a, b


# Random123's known-answer vectors for threefry2x32_20: (key, counter) -> output
KAT = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


def test_fast_threefry_is_registered_and_bit_identical():
    """On CPU spdjax's lowering runs JAX's Threefry: Random123's known answers, a NumPy
    implementation on random counters (including a shape XLA tiles unevenly), and under vmap."""
    assert cpu_tuning.FAST_THREEFRY
    from jax.extend.random import threefry_2x32

    f = jax.jit(threefry_2x32)
    for key, ctr, want in KAT:
        got = f(jnp.asarray(key, jnp.uint32), jnp.asarray(ctr, jnp.uint32))
        assert [int(v) for v in np.asarray(got)] == list(want)
        np.testing.assert_array_equal(np.stack(_threefry_numpy(key, ([ctr[0]], [ctr[1]])))[:, 0], want)
    rng = np.random.default_rng(0)
    key = rng.integers(0, 2**32, 2, dtype=np.uint64).astype(np.uint32)
    ctr = rng.integers(0, 2**32, 2 * 1003, dtype=np.uint64).astype(np.uint32)
    got = np.asarray(f(jnp.asarray(key), jnp.asarray(ctr)))
    a, b = _threefry_numpy(key, (ctr[:1003], ctr[1003:]))
    np.testing.assert_array_equal(got, np.concatenate([a, b]))
    keys = jnp.asarray(rng.integers(0, 2**32, (3, 2), dtype=np.uint64).astype(np.uint32))
    got = np.asarray(jax.jit(jax.vmap(threefry_2x32, (0, None)))(keys, jnp.asarray(ctr[:10])))
    for i in range(3):
        a, b = _threefry_numpy(np.asarray(keys[i]), (ctr[:5], ctr[5:10]))
        np.testing.assert_array_equal(got[i], np.concatenate([a, b]))


DRAW = """
import jax, numpy as np, spdjax
k = jax.random.fold_in(jax.random.key(7), 3)
x = jax.jit(lambda k: (jax.random.uniform(k, (257, 20)), jax.random.bernoulli(k, 0.3, (9,))))(k)
print(spdjax.cpu_tuning.FAST_THREEFRY, np.asarray(x[0]).tobytes().hex()[:4000], np.asarray(x[1]).tolist())
"""


def test_jax_random_draws_unchanged_by_the_lowering():
    """`jax.random` draws are the same with spdjax's lowering and with JAX's own (opted out)."""

    def draw(**env):
        out = subprocess.run([sys.executable, "-c", DRAW], env={**SUBPROCESS_ENV, **env}, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split(maxsplit=1)

    (fast, a), (stock, b) = draw(), draw(SPDJAX_NO_FAST_THREEFRY="1")
    assert (fast, stock) == ("True", "False")
    assert a == b
