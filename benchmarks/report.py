"""Markdown table of a benchmark JSON, with the issue's targets beside the rows they name.

    python benchmarks/report.py benchmarks/results/h200.json > benchmarks/results/h200.md
"""

from __future__ import annotations

import json
import sys

# (model, proj, T, kind, fmt) -> target µs per call (issue "Performance", H200).
TARGETS = {
    ("qwen3", "gate_up", 1, "WMMA", "bf16"): 15, ("qwen3", "gate_up", 1, "WMMA_GGUF", "Q4_K"): 8,
    ("qwen3", "gate_up", 64, "WMMA", "bf16"): 200, ("qwen3", "gate_up", 64, "WMMA_GGUF", "Q4_K"): 120,
    ("qwen3", "gate_up", 512, "WMMA", "bf16"): 260, ("qwen3", "gate_up", 512, "WMMA_GGUF", "Q4_K"): 260,
    ("qwen3", "gate_up", 4096, "WMMA", "bf16"): 450, ("qwen3", "gate_up", 4096, "WMMA_GGUF", "Q4_K"): 600,
    ("mixtral", "gate_up", 1, "WMMA", "bf16"): 115, ("mixtral", "gate_up", 1, "WMMA_GGUF", "Q4_K"): 40,
    ("mixtral", "gate_up", 64, "WMMA", "bf16"): 480, ("mixtral", "gate_up", 64, "WMMA_GGUF", "Q4_K"): 200,
    ("mixtral", "gate_up", 4096, "WMMA", "bf16"): 3100, ("mixtral", "gate_up", 4096, "WMMA_GGUF", "Q4_K"): 4000,
    **{("mixtral", "gate_up", 1, "SCALAR_GGUF", f): t for f, t in
       {"Q8_0": 88, "Q2_K": 78, "Q3_K": 129, "Q4_K": 72, "Q5_K": 81, "Q6_K": 117}.items()},
}


def cell(v) -> str:
    return (f"{v:.2f}" if v < 10 else f"{v:.1f}") if isinstance(v, (int, float)) else "-"


def main(path: str) -> None:
    data = json.load(open(path))
    rows = [r for r in data["rows"] if "us" in r]
    bf16 = {(r["model"], r["proj"], r["T"]): r["us"] for r in rows if r["kind"] == "WMMA"}
    torch = {(r["model"], r["proj"], r["T"]): r["torch_grouped_mm_us"] for r in rows
             if r["kind"] == "WMMA" and "torch_grouped_mm_us" in r}
    print(f"Device: {data['device']}; jax {data['jax']}; XLA_FLAGS `{data['xla_flags']}`\n")
    print("µs per call (device time). TB/s: bytes of the experts routed to over the time. "
          "% floor: the larger of bytes / 4.3 TB/s and flops / 790 TFLOP/s, over the time. "
          "Peers: jax.lax.ragged_dot (rows sorted by expert), gather-then-einsum, torch._grouped_mm, "
          "and for GGUF: decode to bf16 in JAX + the fastest dense peer. "
          "`vs ragged`: ragged_dot's time over ours (> 1: we are faster). `x bf16`: our time over our "
          "bf16 row of the same shape; `x torch`: our time over torch._grouped_mm bf16 of the same "
          "shape in the same run (< 1: we are faster).\n")
    notes = sorted({r["note"] for r in rows if "note" in r})
    print("| model | proj | T | kind | fmt | µs | target | TB/s | TFLOP/s | % floor | ragged_dot | einsum | torch | decode+dense | vs ragged | x bf16 | x torch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        key = (r["model"], r["proj"], r["T"], r["kind"], r["fmt"])
        tgt = TARGETS.get(key)
        mark = "" if tgt is None else (f"{tgt} ✓" if r["us"] <= tgt else f"{tgt} ✗")
        vs = r["ragged_dot_us"] / r["us"] if "ragged_dot_us" in r else None
        # The ratios bench_moe.py computed within its own run, where the row has them.
        xb = r.get("x_bf16", r["us"] / bf16[key[:3]] if r["kind"] != "WMMA" and key[:3] in bf16 else None)
        xt = r.get("x_torch", r["us"] / torch[key[:3]] if key[:3] in torch else None)
        star = "*" * (notes.index(r["note"]) + 1) if "note" in r else ""
        print(f"| {r['model']} | {r['proj']} | {r['T']} | {r['kind']} | {r['fmt']}{star} | {cell(r['us'])} | {mark} | "
              f"{r['weight_tbs']:.2f} | {r['tflops']:.1f} | {r['pct_floor']:.1f} | {cell(r.get('ragged_dot_us'))} | "
              f"{cell(r.get('gather_einsum_us'))} | {cell(r.get('torch_grouped_mm_us'))} | "
              f"{cell(r.get('decode_then_dense_us'))} | {cell(vs)} | {cell(xb)} | {cell(xt)} |")
    for i, n in enumerate(notes):
        print(f"\n{'*' * (i + 1)} {n}.")
    failed = [r for r in data["rows"] if "error" in r]
    for r in failed:
        print(f"\nFAILED {r['model']}/{r['proj']}/{r['T']}/{r['kind']}/{r['fmt']}: {r['error'][:200]}")


if __name__ == "__main__":
    main(sys.argv[1])
