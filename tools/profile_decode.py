"""Where the decode-time kernels' time goes (issue 13's evidence): every decode row of
benchmarks/bench_moe.py (both shapes, gate+up and down, T = 1, 2, 4, 8, every kind and format)
run twice under Nsight Compute, and a table of the second run of each: kernel time against the
routed experts' HBM floor, DRAM and SM throughput, achieved occupancy, registers and warp cycles
per issued instruction.

On the GPU (tools/h200_check.sh decode-ncu does both steps):
    ncu --clock-control none --csv --page details --log-file ncu.csv \\
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \\
        --metrics $(python3 tools/profile_decode.py metrics) --kernel-name regex:"token_gemv|mma_gemv|grouped_w" \\
        python3 tools/profile_decode.py run rows.json [--only SUBSTR,...]
    python3 tools/profile_decode.py table ncu.csv rows.json > decode_ncu.md
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys

KERNEL_RE = "token_gemv|mma_gemv|grouped_w"  # the main kernel of every path (not the grouping helpers)
# Why warps wait: ncu's average warps stalled per issued instruction, by reason (ncu --metrics).
STALLS = ("long_scoreboard", "short_scoreboard", "wait", "barrier", "math_pipe_throttle", "mio_throttle",
          "lg_throttle", "not_selected", "selected", "no_instruction", "dispatch_stall", "branch_resolving",
          "tex_throttle", "membar", "drain", "imc_miss", "sleeping", "misc")
STALL_METRIC = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
CALLS = 2  # per row: the first compiles and warms up; the table takes the last


def kernels_of(plan: str) -> tuple[str, ...]:
    """The CUDA kernel(s) that a plan description (plan.h describe) may launch."""
    return {"token_gemv": ("token_gemv_kernel",), "mma_gemv": ("mma_gemv_kernel",),
            "grouped_wgmma_gguf": ("grouped_wgmma_gguf_kernel",),
            "grouped_wgmma": ("grouped_wgmma_kernel", "grouped_wgmma_ws_kernel"),
            "grouped_wmma": ("grouped_wmma_kernel",)}[plan.split()[0]]


def launched(plan: str, kernel_name: str) -> bool:
    """Whether ncu's (demangled) kernel name is one the plan names."""
    return any(re.search(rf"\b{k}\b", kernel_name) for k in kernels_of(plan))


def run(out_path: str, only: str, ts: tuple[int, ...] | None = None) -> None:
    """Each decode row's call CALLS times (nothing else launches a kernel matching KERNEL_RE);
    the rows, in launch order, with their plan and floor, to out_path. ts: bench_moe.py's rows at
    these T instead of the decode T (1, 2, 4, 8); the floor is then the larger of the routed bytes
    at 4.3 TB/s and the flops at 790 TFLOP/s, as bench_moe.py's."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import bench_moe as bm  # noqa: E402  (sets XLA_FLAGS before jax initializes)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_moe import MoeKind, moe_matmul
    from jax_moe import _ext

    ts = tuple(ts) if ts else bm.DECODE_TS
    rng = np.random.default_rng()
    key = jax.random.PRNGKey(int(rng.integers(1 << 31)))
    rows = []
    for i, (model, proj, T, kind, fmt, _) in enumerate(bm.plan(False)):
        tag = f"{model}/{proj}/{T}/{kind.name}/{fmt}"
        if T not in ts or (only and not any(s in tag for s in only.split(","))):
            continue
        sh = bm.SHAPES[(model, proj)]
        E, k, K, N, per_pair = sh["E"], sh["k"], sh["K"], sh["N"], sh["per_pair"]
        kk = jax.random.fold_in(key, i)
        quantized = kind != MoeKind.WMMA
        w = bm.random_experts(kk, fmt, E, N, K)
        ids = bm.route(rng, T, E, k)
        x_dtype = jnp.float32 if kind == MoeKind.SCALAR_GGUF else jnp.bfloat16
        x = jax.random.normal(jax.random.fold_in(kk, 1), (T, k, K) if per_pair else (T, K), jnp.float32).astype(x_dtype)
        scores = jnp.asarray(rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)) if per_pair else None
        wtype = int(w.qtype) if quantized else int(bm.GGMLType.BF16)
        plan = _ext.cuda.plan_description(int(kind), wtype, 0, T, k, E, N, K, x.shape[0] * (k if per_pair else 1),
                                          per_pair)
        f = jax.jit(lambda x, ids, w, s: moe_matmul(x, ids, w, scores=s, kind=kind, reduce=per_pair))
        for _ in range(CALLS):
            f(x, jnp.asarray(ids), w, scores).block_until_ready()
        floor_us = bm.floor_s(len(np.unique(ids)) * bm.expert_bytes(fmt, N, K), 2.0 * T * k * N * K) * 1e6
        rows.append(dict(tag=tag, plan=plan, floor_us=floor_us))
        print(f"{tag}: {plan}", file=sys.stderr, flush=True)
    with open(out_path, "w") as fh:
        json.dump(rows, fh, indent=1)


def _number(value: str) -> float:
    return float(value.replace(",", ""))


def parse_ncu(text: str) -> list[dict]:
    """ncu --csv --page details output -> one dict per launch (in launch order): kernel name and
    {metric name: (unit, value)}. Lines ncu prints before the CSV (==PROF==, warnings) are skipped."""
    start = text.find('"ID"')
    if start < 0:
        raise ValueError("no ncu CSV header (\"ID\", ...) in the log")
    launches: dict[str, dict] = {}
    for rec in csv.DictReader(io.StringIO(text[start:])):
        if not rec.get("ID") or not rec.get("Metric Name"):
            continue
        lid = rec["ID"]
        d = launches.setdefault(lid, {"kernel": rec["Kernel Name"], "metrics": {}})
        d["metrics"][rec["Metric Name"]] = (rec.get("Metric Unit", ""), rec.get("Metric Value", ""))
    return [launches[k] for k in sorted(launches, key=int)]


def _us(metric: tuple[str, str]) -> float:
    unit, value = metric
    scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6,
             "s": 1e6}[unit]  # ncu 2025+ writes ns / us
    return _number(value) * scale


def top_stalls(metrics: dict, n: int = 3) -> str:
    """The n largest stall reasons of one launch, as 'reason value' (warps per issued instruction)."""
    got = [(_number(metrics[STALL_METRIC.format(r)][1]), r) for r in STALLS if STALL_METRIC.format(r) in metrics]
    return ", ".join(f"{r} {v:.2f}" for v, r in sorted(got, reverse=True)[:n]) or "-"


def table(ncu_text: str, rows: list[dict]) -> str:
    """The markdown table: row i takes launch CALLS * i + CALLS - 1 (its warm call); a launch whose
    kernel is not the one the row's plan names is reported, not guessed around."""
    launches = parse_ncu(ncu_text)
    if len(launches) != CALLS * len(rows):
        raise ValueError(f"{len(launches)} profiled launches for {len(rows)} rows x {CALLS} calls")
    out = ["| row | plan | kernel µs | floor µs | % floor | DRAM % | SM % | occupancy % | registers | cycles / issue "
           "| top stalls (cycles / issue) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        launch = launches[CALLS * i + CALLS - 1]
        if not launched(r["plan"], launch["kernel"]):
            raise ValueError(f"{r['tag']}: plan {r['plan']!r} but the profiled kernel is {launch['kernel'][:60]!r}")
        m = launch["metrics"]
        us = _us(m["Duration"])

        def g(name: str, p: int = 1) -> str:
            return f"{_number(m[name][1]):.{p}f}" if name in m else "-"
        out.append(f"| {r['tag']} | {r['plan']} | {us:.1f} | {r['floor_us']:.1f} | {100 * r['floor_us'] / us:.1f} | "
                   f"{g('DRAM Throughput')} | {g('Compute (SM) Throughput')} | {g('Achieved Occupancy')} | "
                   f"{g('Registers Per Thread', 0)} | {g('Warp Cycles Per Issued Instruction', 2)} | {top_stalls(m)} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the workload (under ncu)")
    r.add_argument("rows")
    r.add_argument("--only", default="", help="substring filter on 'model/proj/T/kind/fmt'")
    r.add_argument("--ts", default="", help="comma-separated T of bench_moe.py's rows (default: 1,2,4,8)")
    t = sub.add_parser("table", help="the markdown table from ncu's CSV and the rows")
    t.add_argument("ncu_csv")
    t.add_argument("rows")
    sub.add_parser("metrics", help="the --metrics list for ncu (the stall reasons)")
    opts = ap.parse_args()
    if opts.cmd == "metrics":
        print(",".join(STALL_METRIC.format(r) for r in STALLS))
    elif opts.cmd == "run":
        run(opts.rows, opts.only, tuple(int(t) for t in opts.ts.split(",")) if opts.ts else None)
    else:
        with open(opts.ncu_csv) as fh, open(opts.rows) as fr:
            sys.stdout.write(table(fh.read(), json.load(fr)))


if __name__ == "__main__":
    main()
