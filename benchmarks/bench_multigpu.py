"""Multi-GPU benchmark: Mixtral-8x7B's MoE block with its experts sharded over every visible
GPU (jax_moe.parallel.ExpertParallel on a 1-d "expert" mesh), next to the same block on one GPU.

Block: router (float32) + top-2 of E = 8 experts + SwiGLU FFN, D = 4096, F = 14336; expert
weights bf16 or Q4_K; T in {1, 64, 512, 4096} tokens. Two ways to hold the tokens:
  replicated  every GPU holds all T tokens (tokens_over_experts=False): one psum per block;
  split       tokens split over the GPUs (tokens_over_experts=True; T a multiple of the GPU
              count): all-gather of the activations, then one reduce-scatter.

Timing is bench_moe.py's: R calls chained inside one jit (distinct inputs per call, each call's
input depending on a scalar of the previous output), µs per call = slope between R and 2R calls
(median of several runs). Bytes between devices come from the compiled HLO of one call: every
collective (all-reduce, reduce-scatter, all-gather, all-to-all, collective-permute, including
their async forms) counted once, with the sizes of its operands, which are per-device shards in
the SPMD module: ``coll_bytes_per_device``; ``coll_bytes_total`` = that x the device count.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        python benchmarks/bench_multigpu.py                  # -> benchmarks/results/multigpu.json
    JAX_PLATFORMS=cpu python benchmarks/bench_multigpu.py --devices-cpu 8 --quick   # dry run
"""

from __future__ import annotations

import os

# NVLink multicast off (the device notes), before jax (and NCCL) start.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections import Counter  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T in {1, 512} only")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/multigpu.json; "
                    "a temporary file with --devices-cpu)")
    ap.add_argument("--devices-cpu", type=int, default=0,
                    help="dry run on this many host CPU devices, on tiny shapes (D = F = 256)")
    ap.add_argument("--only", default="", help="substring filter on 'fmt/T/mode'")
    ap.add_argument("--calls", type=int, default=0, help="R (default: enough for ~1.5 ms of work)")
    return ap.parse_args(argv)


OPTS = parse_args() if __name__ == "__main__" else None

import jax  # noqa: E402

if OPTS is not None and OPTS.devices_cpu:
    jax.config.update("jax_num_cpu_devices", OPTS.devices_cpu)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_moe import BF16_TFLOPS, HBM_TBS, chained, device_time, random_gguf  # noqa: E402

import jax_moe  # noqa: E402
from jax_moe.ffn import MoEWeights  # noqa: E402
from jax_moe.kinds import block_bytes, block_size  # noqa: E402
from jax_moe.parallel import ExpertParallel  # noqa: E402
from jax_moe.routing import RouterConfig  # noqa: E402

MIXTRAL = dict(E=8, k=2, D=4096, F=14336)
TINY = dict(E=8, k=2, D=256, F=256)

# -- bytes moved, from the compiled HLO ------------------------------------------------------------
COLLECTIVES = ("all-reduce", "all-reduce-start", "reduce-scatter", "all-gather", "all-gather-start",
               "all-to-all", "ragged-all-to-all", "collective-permute", "collective-permute-start",
               "collective-broadcast")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|[\s}\])])([a-z][\w\-]*)\(")
_ARRAY = re.compile(r"\b(pred|bf16|f16|f32|f64|[su](?:4|8|16|32|64)|f8\w*)\[([\d,]*)\]")
_NAME = re.compile(r"%([\w.\-]+)")
_BYTES = {"pred": 1, "bf16": 2, "f16": 2, "f32": 4, "f64": 8}


def _array_bytes(text: str) -> int:
    total = 0
    for dt, dims in _ARRAY.findall(text):
        if dt in _BYTES:
            b = _BYTES[dt]
        elif dt.startswith("f8"):
            b = 1
        else:
            b = max(1, int(dt[1:]) // 8)
        total += b * math.prod(int(d) for d in dims.split(",") if d)
    return total


def collective_bytes(hlo_text: str) -> tuple[int, dict]:
    """(sum of the operand bytes of every collective in the module, count by opcode). Operand
    sizes come from their defining instructions (compiled text need not print them); the async
    wrappers (async-start) are not counted, the collective inside them is."""
    shape_of: dict[str, int] = {}
    found = []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, rest = m.groups()
        op = _OPCODE.search(rest)
        if not op:
            continue
        shape_of[name] = _array_bytes(rest[:op.start(1)])
        if op.group(1) in COLLECTIVES:
            args = rest[op.end():]
            depth, end = 1, len(args)
            for i, ch in enumerate(args):
                depth += {"(": 1, ")": -1}.get(ch, 0)
                if depth == 0:
                    end = i
                    break
            found.append((op.group(1), _NAME.findall(args[:end])))
    total = sum(shape_of.get(n, 0) for _, names in found for n in names)
    return total, dict(Counter(op for op, _ in found))


# -- the block ----------------------------------------------------------------------------------------
def make_weights(key, fmt: str, sh: dict, dev) -> MoEWeights:
    E, D, F = sh["E"], sh["D"], sh["F"]
    k1, k2, k3 = jax.random.split(key, 3)
    with jax.default_device(dev):
        router = jax.random.normal(k3, (D, E), jnp.float32) / math.sqrt(D)
        if fmt == "bf16":
            gu = (jax.random.normal(k1, (E, 2 * F, D), jnp.float32) / math.sqrt(D)).astype(jnp.bfloat16)
            dn = (jax.random.normal(k2, (E, D, F), jnp.float32) / math.sqrt(F)).astype(jnp.bfloat16)
        else:
            gu, dn = random_gguf(k1, fmt, E, 2 * F, D), random_gguf(k2, fmt, E, D, F)
        w = MoEWeights(router=router, down=dn, gate_up=gu, config=RouterConfig(k=sh["k"]))
    return jax.block_until_ready(w)


def expert_bytes(fmt: str, N: int, K: int) -> int:
    return N * (K // block_size(fmt) * block_bytes(fmt) if fmt != "bf16" else K * 2)


def bench_row(key, fmt: str, T: int, modes, sh: dict, devs, w1: MoEWeights, opts) -> list[dict]:
    E, k, D, F = sh["E"], sh["k"], sh["D"], sh["F"]
    n = len(devs)
    per_expert = expert_bytes(fmt, 2 * F, D) + expert_bytes(fmt, D, F)
    touched = min(E, T * k)  # experts a call reads, at most
    flops = 2.0 * T * k * 3 * F * D
    floor = max(touched * per_expert / (HBM_TBS * 1e12), flops / (BF16_TFLOPS * 1e12))
    calls = opts.calls or int(min(max(math.ceil(1.5e-3 / floor), 10), 64))
    xs = [jax.device_put(jax.random.normal(jax.random.fold_in(key, i), (T, D), jnp.float32)
                         .astype(jnp.bfloat16), devs[0]) for i in range(2 * calls)]

    def make_one(r):
        def f(xl, w):
            return chained(lambda i, xi: w(xi), r, xl)
        return jax.jit(f), (xs[:r], w1)

    us_one = device_time(make_one, calls) * 1e6
    # Auto axes: the chain's scalar of a token-split output is then a plain (tiny) collective.
    mesh = jax.make_mesh((n,), ("expert",), axis_types=(AxisType.Auto,), devices=devs)
    rows = []
    for mode in modes:
        tag = f"{fmt}/{T}/{mode}"
        base = dict(model="mixtral-8x7b" if sh is MIXTRAL else "tiny-dryrun", block="router+experts", fmt=fmt, T=T, mode=mode, E=E, k=k,
                    D=D, F=F, devices=n, calls=calls, us_1gpu=us_one)
        try:
            ep = ExpertParallel(mesh, expert_axis="expert", data_axis=None,
                                tokens_over_experts=(mode == "split"))
            sw = ep.shard_weights(w1)
            xe = [ep.shard_tokens(x) for x in xs]

            def make_ep(r):
                def f(xl, w):
                    return chained(lambda i, xi: ep.block(xi, w), r, xl)
                return jax.jit(f), (xe[:r], sw)

            us_ep = device_time(make_ep, calls) * 1e6
            text = jax.jit(lambda x, w: ep.block(x, w)).lower(xe[0], sw).compile().as_text()
            per_dev, ops = collective_bytes(text)
            rows.append(dict(base, us_ep=us_ep, speedup=us_one / us_ep, coll_bytes_per_device=per_dev,
                             coll_bytes_total=per_dev * n, collectives=ops, bytes_source="compiled HLO"))
            del sw, xe
        except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
            print(f"{tag}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append(dict(base, error=f"{type(e).__name__}: {str(e)[:500]}"))
    return rows


HEADER = (f"{'fmt':5s} {'T':>5s} {'mode':10s} {'GPUs':>4s} {'1 GPU us':>10s} {'EP us':>10s} "
          f"{'speedup':>7s} {'bytes/dev':>12s} {'bytes total':>12s}  collectives")


def fmt_row(r: dict) -> str:
    if "error" in r:
        return f"{r['fmt']:5s} {r['T']:5d} {r['mode']:10s} {r['devices']:4d} {r['us_1gpu']:10.1f}  ERROR {r['error'][:80]}"
    ops = ",".join(f"{k}x{v}" for k, v in sorted(r["collectives"].items()))
    return (f"{r['fmt']:5s} {r['T']:5d} {r['mode']:10s} {r['devices']:4d} {r['us_1gpu']:10.1f} "
            f"{r['us_ep']:10.1f} {r['speedup']:7.2f} {r['coll_bytes_per_device']:12d} "
            f"{r['coll_bytes_total']:12d}  {ops}")


def main(opts) -> None:
    dry = opts.devices_cpu > 0
    devs = jax.devices("cpu")[:opts.devices_cpu] if dry else jax.devices()
    n = max(d for d in (1, 2, 4, 8) if d <= len(devs))  # E = 8 must split evenly
    devs = devs[:n]
    if n < 2:
        sys.exit(f"bench_multigpu: needs two or more devices; found {len(devs)} ({devs})")
    sh = TINY if dry else MIXTRAL
    Ts = (1, 64) if dry and opts.quick else ((1, 512) if opts.quick else (1, 64, 512, 4096))
    out = opts.out or (os.path.join(tempfile.gettempdir(), "multigpu-dryrun.json") if dry
                       else "benchmarks/results/multigpu.json")
    print(f"devices: {n} x {devs[0].device_kind}; jax {jax.__version__}; shapes {sh}")
    print(f"NCCL_NVLS_ENABLE={os.environ['NCCL_NVLS_ENABLE']} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    key = jax.random.PRNGKey(int(np.random.default_rng().integers(1 << 31)))
    rows = []

    def write():
        with open(out, "w") as f:
            json.dump(dict(device=devs[0].device_kind, devices=n, dry_run=dry, jax=jax.__version__,
                           xla_flags=os.environ.get("XLA_FLAGS", ""), build=jax_moe.build_info(),
                           nvls_env={k: os.environ[k] for k in ("NCCL_NVLS_ENABLE",
                                     "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")},
                           shapes=sh, bytes_source="compiled HLO: operand sizes of every collective "
                           "(per-device shards), x devices for the total", rows=rows), f, indent=1)

    print(HEADER, flush=True)
    for i, fmt in enumerate(("bf16", "Q4_K")):
        w1 = make_weights(jax.random.fold_in(key, i), fmt, sh, devs[0])
        for T in Ts:
            modes = [m for m in ("replicated", "split") if m == "replicated" or T % n == 0]
            modes = [m for m in modes if not opts.only or any(s in f"{fmt}/{T}/{m}" for s in opts.only.split(","))]
            if not modes:
                continue
            try:
                new = bench_row(jax.random.fold_in(key, 100 * i + T), fmt, T, modes, sh, devs, w1, opts)
            except Exception as e:  # noqa: BLE001 - the one-GPU figure failed: keep going
                print(f"{fmt}/{T}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                new = [dict(fmt=fmt, T=T, error=f"{type(e).__name__}: {str(e)[:500]}")]
            for r in new:
                rows.append(r)
                print(fmt_row(r) if "us_1gpu" in r else f"{fmt}/{T}: {r['error']}", flush=True)
            write()  # after every row: a run cut short keeps what it measured
        del w1
    write()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(OPTS)
