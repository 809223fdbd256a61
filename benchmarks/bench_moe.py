"""GPU benchmark: jax_moe against its peers on the same work, in one run (docs/contract.md §8).

Each row is one (model, projection, T, kind, format). Every number is device time per call:
R calls inside one jitted function (10 <= R <= 64, enough for ~1.5 ms of work), weights rotated among copies whose touched bytes
add up to 4x the L2 cache; the time per call is the slope between R and 2R calls (medians of
several runs), which leaves out the fixed cost of dispatching the jit. Inputs are fresh random data.

    python benchmarks/bench_moe.py --quick            # < 3 minutes
    python benchmarks/bench_moe.py --out benchmarks/results/h200.json
    python benchmarks/bench_moe.py --only qwen3/gate_up/1/,qwen3/gate_up/2/   # a part (device limits)

Columns: µs per call; weight TB/s (bytes of the experts actually routed to, over the time);
TFLOP/s; % of the floor (max of bytes / 4.3 TB/s and flops / 790 TFLOP/s, the H200's measured
ceilings); for quantized rows the time over our bf16 row (xbf16); every row's time over
torch._grouped_mm bf16 of the same shape in the same run (xtorch); and each peer's µs: jax.lax.ragged_dot on rows sorted by expert, gather-then-einsum,
torch._grouped_mm (when torch imports), and for GGUF formats "decode to bf16 in JAX, then the
fastest dense peer".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for torch
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1",
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import peers  # noqa: E402

import jax_moe  # noqa: E402
from jax_moe import MoeKind, QuantizedExperts, moe_matmul  # noqa: E402
from jax_moe.kinds import GGMLType, block_bytes, block_size  # noqa: E402

HBM_TBS = 4.3  # measured device-to-device copy on the H200 (bytes read + written)
BF16_TFLOPS = 790.0  # measured bf16 GEMM on the H200
L2_BYTES = 50e6

SHAPES = {
    ("mixtral", "gate_up"): dict(E=8, k=2, K=4096, N=2 * 14336, per_pair=False),
    ("mixtral", "down"): dict(E=8, k=2, K=14336, N=4096, per_pair=True),
    ("qwen3", "gate_up"): dict(E=128, k=8, K=2048, N=2 * 768, per_pair=False),
    ("qwen3", "down"): dict(E=128, k=8, K=768, N=2048, per_pair=True),
}
SCALE_OFFSETS = {"Q8_0": (0,), "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
E8M0_OFFSETS = {"MXFP4": 0}  # one-byte power-of-two scales (E8M0)


def chained(op, n: int, xl):
    """n calls op(i, x_i) made one after another: call i+1's input depends on a scalar of call i's
    output (times zero), so XLA can neither merge independent calls sharing a weight operand nor
    reorder them. Every timed path, ours and the peers', goes through this."""
    outs, prev = [], None
    for i in range(n):
        xi = xl[i] if prev is None else xl[i] + (prev * 0).astype(xl[i].dtype)
        out = op(i, xi)
        prev = out.reshape(-1)[0]
        outs.append(out)
    return tuple(outs)


def _median_time(fn, args, runs: int) -> float:
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_time(make, calls: int, runs: int = 5) -> float:
    """Seconds per call on the device. make(n) returns (jitted fn, args) making n calls inside one
    jit; the time per call is the slope between n = calls and n = 2 * calls, which leaves out the
    fixed cost of dispatching the jit and launching its graph."""
    f1, a1 = make(calls)
    f2, a2 = make(2 * calls)
    t1 = _median_time(f1, a1, runs)
    t2 = _median_time(f2, a2, runs)
    return max(t2 - t1, 1e-9) / calls


def expert_bytes(fmt: str, N: int, K: int) -> int:
    """Bytes of one [N, K] expert: bf16, or the GGUF blocks of `fmt`."""
    return N * (K * 2 if fmt == "bf16" else K // block_size(fmt) * block_bytes(fmt))


def random_experts(key, fmt: str, E: int, N: int, K: int):
    """Random [E, N, K] experts on the device: bf16 ~ N(0, 1/K), or random_gguf blocks."""
    if fmt == "bf16":
        return (jax.random.normal(key, (E, N, K), jnp.float32) / math.sqrt(K)).astype(jnp.bfloat16)
    return random_gguf(key, fmt, E, N, K)


def random_gguf(key, fmt: str, E: int, N: int, K: int) -> QuantizedExperts:
    """Random GGUF blocks with finite scales (fp16 in [1e-3, 1e-2]; E8M0 2^-9 .. 2^-1), made on the
    device."""
    qk, bb = block_size(fmt), block_bytes(fmt)
    k1, k2 = jax.random.split(key)
    raw = jax.random.bits(k1, (E, N, K // qk, bb), jnp.uint8)
    if fmt in E8M0_OFFSETS:  # scales 2^-9 .. 2^-1
        e = jax.random.randint(k2, (E, N, K // qk), 118, 127).astype(jnp.uint8)
        raw = raw.at[..., E8M0_OFFSETS[fmt]].set(e)
    for i, off in enumerate(SCALE_OFFSETS.get(fmt, ())):
        h = jax.random.uniform(jax.random.fold_in(k2, i), (E, N, K // qk), jnp.float32, 1e-3, 1e-2)
        hb = jax.lax.bitcast_convert_type(h.astype(jnp.float16), jnp.uint8)  # [..., 2]
        raw = raw.at[..., off:off + 2].set(hb)
    return QuantizedExperts(raw.reshape(E, N, K // qk * bb), fmt, (E, N, K))


def route(rng, T: int, E: int, k: int) -> np.ndarray:
    """k distinct experts per token, uniformly at random (as a top-k router gives)."""
    return np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int32)


def floor_s(touched_bytes: float, flops: float) -> float:
    """A row's floor in seconds: its routed experts' bytes at HBM_TBS or its flops at BF16_TFLOPS,
    whichever takes longer."""
    return max(touched_bytes / (HBM_TBS * 1e12), flops / (BF16_TFLOPS * 1e12))


def bench_row(rng, key, model: str, proj: str, T: int, kind: MoeKind, fmt: str, opts) -> dict:
    sh = SHAPES[(model, proj)]
    E, k, K, N, per_pair = sh["E"], sh["k"], sh["K"], sh["N"], sh["per_pair"]
    quantized = kind != MoeKind.WMMA
    ids = route(rng, T, E, k)
    touched = len(np.unique(ids))
    x_dtype = jnp.float32 if kind == MoeKind.SCALAR_GGUF else jnp.bfloat16
    xs = (T, k, K) if per_pair else (T, K)
    scores = jnp.asarray(rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)) if per_pair else None
    reduce = per_pair
    one_expert = expert_bytes(fmt, N, K)
    touched_bytes = touched * one_expert
    copies = int(min(max(math.ceil(4 * L2_BYTES / touched_bytes), 2), 16,
                     max(2, opts.weight_budget // (E * one_expert))))
    keys = jax.random.split(key, copies)
    ws = [random_experts(kk, fmt, E, N, K) for kk in keys]
    flops = 2.0 * T * k * N * K
    floor = floor_s(touched_bytes, flops)
    # Enough calls that the slope measures >= ~1.5 ms of device work (noise of the fixed cost).
    calls = int(min(max(math.ceil(1.5e-3 / floor), 10, 2 * copies), 64))
    idsj = jnp.asarray(ids)
    # Distinct activations for every call: XLA would merge calls on identical operands (CSE).
    kx = jax.random.fold_in(key, 7)
    x_list = [jax.random.normal(jax.random.fold_in(kx, i), xs, jnp.float32).astype(x_dtype)
              for i in range(2 * calls)]

    def make_ours(n):
        def ours(xl, ids, s, ws):
            return chained(lambda i, xi: moe_matmul(xi, ids, ws[i % len(ws)], s, kind=kind, reduce=reduce), n, xl)
        return jax.jit(ours), (x_list[:n], idsj, scores, ws)

    t_ours = device_time(make_ours, calls)
    row = dict(model=model, proj=proj, T=T, kind=kind.name, fmt=fmt, E=E, k=k, N=N, K=K,
               us=t_ours * 1e6, weight_tbs=touched_bytes / t_ours / 1e12, tflops=flops / t_ours / 1e12,
               floor_us=floor * 1e6, pct_floor=100.0 * floor / t_ours, copies=copies, calls=calls)

    # Peers, on bf16 weights (decoded weights for GGUF) and the same routing.
    if opts.peers:
        dense = ws if not quantized else [
            peers.DECODERS[fmt](w.data, E, N, K) if fmt in peers.DECODERS else None for w in ws]
        if quantized and dense[0] is None:
            dense = [random_experts(kk, "bf16", E, N, K) for kk in keys]
        xb = [x.astype(jnp.bfloat16) for x in x_list]
        order = np.argsort(ids.reshape(-1), kind="stable")
        group_sizes = np.bincount(ids.reshape(-1), minlength=E).astype(np.int32)
        x_sorted = [jnp.take(x.reshape(T * k, K) if per_pair else jnp.repeat(x, k, axis=0), order, axis=0)
                    for x in xb]
        gs = jnp.asarray(group_sizes)
        w_ekn = [jnp.swapaxes(w, 1, 2) for w in dense]
        jax.block_until_ready((w_ekn, x_sorted))

        def make_rd(n):
            def rd(xl, gs_, w):
                return chained(lambda i, xi: peers.ragged_dot(xi, w[i % len(w)], gs_), n, xl)
            return jax.jit(rd), (x_sorted[:n], gs, w_ekn)

        _peer(row, "ragged_dot_us", lambda: device_time(make_rd, calls) * 1e6)
        del w_ekn
        if T * k * N * K * 2 <= opts.gather_budget:
            def make_ge(n):
                def ge(xl, ids_, w):
                    return chained(lambda i, xi: peers.gather_einsum(xi, ids_, w[i % len(w)]), n, xl)
                return jax.jit(ge), (xb[:n], idsj, dense)

            _peer(row, "gather_einsum_us", lambda: device_time(make_ge, calls) * 1e6)
        torch = peers.torch_grouped_mm()
        if torch is not None:
            try:
                row["torch_grouped_mm_us"] = torch_time(torch, np.asarray(x_sorted[0].astype(jnp.float32)),
                                                        group_sizes, E, N, K, copies, calls)
            except Exception as e:  # noqa: BLE001 - report, don't fail the run
                row["torch_grouped_mm_error"] = str(e)[:200]
        if quantized and fmt in peers.DECODERS:
            def make_dec(n):  # one call per copy: distinct operands, nothing for XLA to merge
                def dec(w):
                    return tuple(peers.DECODERS[fmt](wi.data, E, N, K) for wi in w)
                return jax.jit(dec), (ws[:n],)

            half = max(1, len(ws) // 2)
            _peer(row, "decode_us", lambda: device_time(make_dec, half) * 1e6)
            dense_peers = [row[p] for p in ("ragged_dot_us", "gather_einsum_us", "torch_grouped_mm_us") if p in row]
            if "decode_us" in row and dense_peers:
                row["decode_then_dense_us"] = row["decode_us"] + min(dense_peers)
        del dense
    return row


def _peer(row: dict, key: str, measure) -> None:
    """Record one peer's time, or why it could not run (out of memory, unsupported)."""
    try:
        row[key] = measure()
    except Exception as e:  # noqa: BLE001 - a peer that cannot run must not lose the row
        row[key.replace("_us", "_error")] = f"{type(e).__name__}: {str(e)[:160]}"


def torch_time(torch, x_sorted: np.ndarray, group_sizes: np.ndarray, E: int, N: int, K: int,
               copies: int, calls: int) -> float:
    dev = torch.device("cuda")
    xs = torch.from_numpy(np.array(x_sorted)).to(dev, torch.bfloat16)
    offs = torch.from_numpy(np.cumsum(group_sizes).astype(np.int32)).to(dev)
    ws = [(torch.randn(E, N, K, device=dev, dtype=torch.bfloat16) / math.sqrt(K)).transpose(-2, -1)
          for _ in range(copies)]
    for _ in range(2):
        for i in range(calls):
            torch._grouped_mm(xs, ws[i % copies], offs=offs)
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(calls):
            torch._grouped_mm(xs, ws[i % copies], offs=offs)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    del ws
    torch.cuda.empty_cache()
    return statistics.median(times)


def add_ratios(rows: list[dict]) -> None:
    """Each quantized row's time over our bf16 row and over torch._grouped_mm (bf16, measured in
    the bf16 row of the same model, projection and T, in the same run): `x_bf16`, `x_torch`."""
    dense = {(r["model"], r["proj"], r["T"]): r for r in rows if r.get("kind") == "WMMA" and "us" in r}
    for r in rows:
        d = dense.get((r.get("model"), r.get("proj"), r.get("T")))
        if "us" not in r or d is None:
            continue
        if r["kind"] != "WMMA":
            r["x_bf16"] = r["us"] / d["us"]
        torch_us = r.get("torch_grouped_mm_us", d.get("torch_grouped_mm_us"))
        if torch_us:
            r["x_torch"] = r["us"] / torch_us


def fmt_row(r: dict) -> str:
    def g(key, w=9, p=1):
        v = r.get(key)
        return f"{v:{w}.{p}f}" if isinstance(v, float) else f"{'-':>{w}}"
    return (f"{r['model']:8s} {r['proj']:8s} {r['T']:5d} {r['kind']:11s} {r['fmt']:5s} {r['us']:9.1f} "
            f"{r['weight_tbs']:6.2f} {r['tflops']:7.1f} {r['pct_floor']:6.1f}% {g('x_bf16', 6, 2)} {g('x_torch', 6, 2)} "
            f"{g('ragged_dot_us')} {g('gather_einsum_us')} {g('torch_grouped_mm_us')} {g('decode_then_dense_us')}")


HEADER = (f"{'model':8s} {'proj':8s} {'T':>5s} {'kind':11s} {'fmt':5s} {'us':>9s} {'TB/s':>6s} "
          f"{'TFLOP/s':>7s} {'%floor':>7s} {'xbf16':>6s} {'xtorch':>6s} {'ragged':>9s} {'einsum':>9s} {'torch':>9s} "
          f"{'dec+best':>9s}")


# Every GGUF format the library runs; MXFP4 where this build's GGMLType has it.
FORMATS = ["Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"] + (["MXFP4"] if hasattr(GGMLType, "MXFP4") else [])
DECODE_TS = (1, 2, 4, 8)  # decode-time T: every kind and format
# T on both sides of the plan's mma-GEMV / fused-GEMM crossover (csrc/cuda/plan.h: Q4_K at most 11
# pairs per expert and 1024 pairs): Qwen3 (E=128, k=8) switches after T=128, Mixtral (E=8, k=2) after T=44.
CROSSOVER_TS = {"qwen3": (16, 32, 80, 128, 160), "mixtral": (16, 32, 40, 44, 48, 56, 72)}


def plan(quick: bool):
    """Rows as (model, proj, T, kind, fmt, with_peers). Every shape (Qwen3-30B-A3B and
    Mixtral-8x7B, gate+up and down) at T = 1, 2, 4, 8 (decode) for every kind and format, and at
    T = 64, 512, 4096 for bf16 and Q4_K (every format through WMMA_GGUF for gate+up at T = 4096),
    and gate+up bf16 and Q4_K on both sides of the GEMV/GEMM crossover (CROSSOVER_TS, no peers).
    Peers (ragged_dot, einsum, torch._grouped_mm, decode+dense) on the bf16 and Q4_K rows; every
    quantized row is reported against the bf16 row's torch time (add_ratios)."""
    rows = []
    if quick:
        shapes = [("qwen3", "gate_up", (1, 8, 64, 4096)), ("mixtral", "gate_up", (1, 8, 64, 4096))]
    else:
        shapes = [(m, p, DECODE_TS + (64, 512, 4096)) for m, p in
                  [("qwen3", "gate_up"), ("mixtral", "gate_up"), ("qwen3", "down"), ("mixtral", "down")]]
    for model, proj, Ts in shapes:
        for T in Ts:
            decode = T in DECODE_TS and not quick
            rows.append((model, proj, T, MoeKind.WMMA, "bf16", True))
            every = decode or (not quick and proj == "gate_up" and T == 4096)
            for fmt in (FORMATS if every else ["Q4_K"]):
                rows.append((model, proj, T, MoeKind.WMMA_GGUF, fmt, fmt == "Q4_K"))
            if decode or (quick and T == 1):
                for fmt in (FORMATS if decode else ["Q4_K"]):
                    rows.append((model, proj, T, MoeKind.SCALAR_GGUF, fmt, False))
    if not quick:
        for model, Ts in CROSSOVER_TS.items():
            for T in Ts:
                rows.append((model, "gate_up", T, MoeKind.WMMA, "bf16", False))
                rows.append((model, "gate_up", T, MoeKind.WMMA_GGUF, "Q4_K", False))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a subset that finishes in under 3 minutes")
    ap.add_argument("--out", default="benchmarks/results/latest.json")
    ap.add_argument("--no-peers", dest="peers", action="store_false")
    ap.add_argument("--only", default="", help="substring filter on 'model/proj/T/kind/fmt'")
    ap.add_argument("--weight-budget", type=float, default=24e9, help="bytes of weight copies per row")
    ap.add_argument("--gather-budget", type=float, default=8e9, help="max bytes gathered by the einsum peer")
    opts = ap.parse_args()
    opts.weight_budget = int(opts.weight_budget)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}; jax {jax.__version__}; jax_moe {jax_moe.build_info()}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
    rng = np.random.default_rng()
    key = jax.random.PRNGKey(int(rng.integers(1 << 31)))
    rows = []
    os.makedirs(os.path.dirname(opts.out) or ".", exist_ok=True)

    def write(rows):
        with open(opts.out, "w") as f:
            json.dump(dict(device=dev.device_kind, jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
                           build=jax_moe.build_info(), rows=rows), f, indent=1)

    print(HEADER, flush=True)
    planned = plan(opts.quick)
    tags = [f"{m}/{p}/{T}/{kind.name}/{fmt}" for m, p, T, kind, fmt, _ in planned]
    chosen = {t for t in tags if not opts.only or any(s in t for s in opts.only.split(","))}
    # A selected quantized row brings its shape's bf16 row (ratios and torch in the same run).
    keys = {t.rsplit("/", 2)[0] for t in chosen}
    chosen |= {t for t, r in zip(tags, planned) if r[3] == MoeKind.WMMA and t.rsplit("/", 2)[0] in keys}
    for i, (model, proj, T, kind, fmt, with_peers) in enumerate(planned):
        tag = tags[i]
        if tag not in chosen:
            continue
        try:
            row_opts = argparse.Namespace(**{**vars(opts), "peers": opts.peers and with_peers})
            r = bench_row(rng, jax.random.fold_in(key, i), model, proj, T, kind, fmt, row_opts)
        except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
            print(f"{tag}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append(dict(model=model, proj=proj, T=T, kind=kind.name, fmt=fmt, error=str(e)[:500]))
            write(rows)
            continue
        rows.append(r)
        add_ratios(rows)
        print(fmt_row(r), flush=True)
        write(rows)  # after every row: a run cut short keeps what it measured
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
