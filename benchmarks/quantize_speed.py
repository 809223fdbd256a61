"""Host quantizer throughput on one Mixtral-8x7B layer's gate: [8, 14336, 4096] f32 -> Q4_K.

Issue target: under 30 s on a 2-core machine. Run: python benchmarks/quantize_speed.py [--qtype Q4_K]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import jax_moe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--qtype", default="Q4_K")
    ap.add_argument("--shape", default="8,14336,4096")
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    rng = np.random.default_rng()
    t0 = time.perf_counter()
    x = rng.standard_normal(shape, dtype=np.float32)
    t1 = time.perf_counter()
    q = jax_moe.quantize(x, args.qtype)
    t2 = time.perf_counter()
    mb = x.nbytes / 1e6
    print(f"generate {t1 - t0:.1f} s; quantize {shape} f32 ({mb:.0f} MB) to {args.qtype} on "
          f"{os.cpu_count()} cores: {t2 - t1:.2f} s = {mb / (t2 - t1):.0f} MB/s of f32 input, "
          f"{q.nbytes / 1e6:.0f} MB out")


if __name__ == "__main__":
    main()
