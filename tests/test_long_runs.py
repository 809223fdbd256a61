"""Long and concurrent use on the CPU.

- 10,000 calls in a loop (the three kinds in turn, jitted and eager, small shapes) hold host
  memory steady (resident set size), leave no live arrays behind and keep giving the same bits
  (device memory too, where the device reports it: the GPU version is in test_gpu_properties.py).
- Calls from 8 Python threads at once return the same bits as the same calls made serially:
  moe_matmul (jitted and eager, every kind) and the host codecs (which release the GIL).
"""

from __future__ import annotations

import gc
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_moe
from jax_moe import MoeKind, moe_matmul

from cases import make_case
from test_properties import bits

CALLS = 10_000
THREADS = 8


def rss_mib() -> float:
    """Resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def device_bytes(dev) -> int | None:
    stats = dev.memory_stats()
    return None if not stats else int(stats.get("bytes_in_use", 0))


def small_cases(rng):
    """(name, fn, args) for every kind, both x ranks and both reduce modes, small shapes."""
    out = []
    for kind, fmt, dtype in ((MoeKind.WMMA, None, "bfloat16"), (MoeKind.WMMA, None, "float16"),
                             (MoeKind.WMMA_GGUF, "Q4_K", "bfloat16"), (MoeKind.WMMA_GGUF, "Q8_0", "float16"),
                             (MoeKind.SCALAR_GGUF, "Q6_K", "float32"), (MoeKind.SCALAR_GGUF, "Q2_K", "float32")):
        for x_rank, reduce in ((2, True), (3, False)):
            c = make_case(rng, kind=kind, fmt=fmt, dtype=dtype, T=6, k=2, E=4, N=24, x_rank=x_rank, reduce=reduce)
            w = c.w
            if isinstance(w, jax_moe.QuantizedExperts):
                w = jax_moe.QuantizedExperts(jnp.asarray(w.data), w.qtype, w.shape)
            args = (jnp.asarray(c.x), jnp.asarray(c.ids), w, jnp.asarray(c.scores))
            fn = jax.jit(lambda x, i, w, s, reduce=reduce: moe_matmul(x, i, w, s, reduce=reduce))
            out.append((f"{kind.name}/{fmt}/{dtype}/x{x_rank}", fn, args, reduce))
    return out


def test_ten_thousand_calls_hold_memory_steady(rng):
    cases = small_cases(rng)
    dev = jax.devices("cpu")[0]
    expected = [np.array(bits(fn(*args))) for _, fn, args, _ in cases]
    # Warm up: compile, let the allocator and the thread pools reach their steady state.
    for i in range(300):
        _, fn, args, _ = cases[i % len(cases)]
        fn(*args).block_until_ready()
    gc.collect()
    live0, rss0, dev0 = len(jax.live_arrays()), rss_mib(), device_bytes(dev)
    samples = []
    for i in range(CALLS):
        name, fn, args, reduce = cases[i % len(cases)]
        if i % 50 == 0:  # now and then eagerly, through the primitive's own dispatch
            out = moe_matmul(*args, reduce=reduce)
        else:
            out = fn(*args)
        out.block_until_ready()
        if i % 1000 == 999:
            j = i % len(cases)
            np.testing.assert_array_equal(bits(out), expected[j], err_msg=f"call {i} ({name}) changed")
            del out
            gc.collect()
            samples.append(rss_mib())
    gc.collect()
    live1, rss1, dev1 = len(jax.live_arrays()), rss_mib(), device_bytes(dev)
    assert live1 <= live0, f"{live1 - live0} arrays leaked over {CALLS} calls"
    # Steady: no growth between the second and the last thousand calls beyond allocator noise.
    growth = samples[-1] - samples[1]
    assert growth < 16, f"resident memory grew by {growth:.1f} MiB over {CALLS} calls: {samples}"
    assert rss1 - rss0 < 48, f"resident memory grew from {rss0:.0f} to {rss1:.0f} MiB"
    if dev0 is not None:
        assert dev1 <= dev0 + (1 << 20), f"device memory grew from {dev0} to {dev1} bytes"


def _hammer(fn, n_threads: int, rounds: int):
    """Run fn(thread, round) from n_threads threads released at once; re-raise any failure."""
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def worker(t):
        try:
            barrier.wait()
            for r in range(rounds):
                fn(t, r)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


def test_eight_threads_match_serial_calls(rng):
    cases = small_cases(rng)
    serial = [np.array(bits(fn(*args))) for _, fn, args, _ in cases]
    serial_eager = [np.array(bits(moe_matmul(*args, reduce=reduce))) for _, _, args, reduce in cases]
    for a, b in zip(serial, serial_eager):
        np.testing.assert_array_equal(a, b)

    def run(t, r):
        order = np.random.default_rng(1000 * t + r).permutation(len(cases))
        for j in order:
            name, fn, args, reduce = cases[j]
            out = fn(*args) if (t + r + j) % 3 else moe_matmul(*args, reduce=reduce)
            np.testing.assert_array_equal(bits(out), serial[j], err_msg=f"thread {t} round {r}: {name}")
    _hammer(run, THREADS, rounds=6)


def test_eight_threads_larger_calls_match_serial(rng):
    """Calls big enough for the kernel's own worker threads to overlap across Python threads."""
    cases = []
    for kind, fmt in ((MoeKind.WMMA, None), (MoeKind.WMMA_GGUF, "Q5_K"), (MoeKind.SCALAR_GGUF, "Q3_K")):
        c = make_case(rng, kind=kind, fmt=fmt, T=300, k=4, E=8, N=96, K=512 if fmt else 384)
        cases.append((jax.jit(moe_matmul), (c.x, jnp.asarray(c.ids), c.w, jnp.asarray(c.scores))))
    serial = [np.array(bits(fn(*args))) for fn, args in cases]

    def run(t, r):
        j = (t + r) % len(cases)
        fn, args = cases[j]
        np.testing.assert_array_equal(bits(fn(*args)), serial[j], err_msg=f"thread {t} round {r}")
    _hammer(run, THREADS, rounds=3)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K", "Q6_K"])
def test_eight_threads_codecs_match_serial(rng, fmt):
    xs = [rng.standard_normal((4, 16, 512)).astype(np.float32) for _ in range(THREADS)]
    serial_q = [np.asarray(jax_moe.quantize(x, fmt).data) for x in xs]
    serial_d = [jax_moe.dequantize(jax_moe.quantize(x, fmt)) for x in xs]

    def run(t, r):
        q = jax_moe.quantize(xs[(t + r) % THREADS], fmt)
        np.testing.assert_array_equal(np.asarray(q.data), serial_q[(t + r) % THREADS])
        np.testing.assert_array_equal(jax_moe.dequantize(q).view(np.uint32), serial_d[(t + r) % THREADS].view(np.uint32))
    _hammer(run, THREADS, rounds=3)
