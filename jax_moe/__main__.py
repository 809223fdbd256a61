"""``python -m jax_moe``: run an MoE block in each kernel kind, check it, time it.

With no arguments: a small Mixtral-style block (E=8, k=2, SwiGLU) with random weights,
quantized to Q4_K. With ``--gguf FILE --block N``: block N of a GGUF checkpoint (needs the
``gguf`` package). Each kind runs the whole block (router + experts) under ``jax.jit`` on the
best device that has it (a CUDA GPU, else the CPU):

- SCALAR_GGUF: float32 activations, GGUF experts;
- WMMA: bfloat16 activations, dense bfloat16 experts (the GGUF experts decoded);
- WMMA_GGUF: bfloat16 activations, GGUF experts.

The output is checked against a float64 reference of the expert FFN computed from the same
weights (decoded exactly) and the routing the block chose; the table gives the largest error
relative to the output's scale and the time per call. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import quantized as _quantized
from ._ext import build_info
from .ffn import EXPERT_NAMES, GptOssActivation, MoEWeights, expert_bias_arrays
from .kinds import MoeKind
from .routing import RouterConfig

KINDS = (MoeKind.SCALAR_GGUF, MoeKind.WMMA, MoeKind.WMMA_GGUF)
# A sanity bound on max |out - ref| / max |ref|: bfloat16 roundings of the activations,
# the hidden state and the output (WMMA*), or the q8_1 staging of activations (SCALAR_GGUF), are
# a few parts in a thousand; a wrong expert, weight or score is tens of percent.
MAX_ERROR = 2.0**-5
_EXPERTS = EXPERT_NAMES


def _random_block(rng: np.random.Generator, *, experts: int, k: int, d: int, f: int,
                  qtype: str, down_qtype: str) -> MoEWeights:
    """A Mixtral-style block: softmax top-k renormalized, SwiGLU, quantized experts."""
    gate_up = rng.standard_normal((experts, 2 * f, d), np.float32) / np.float32(np.sqrt(d))
    down = rng.standard_normal((experts, d, f), np.float32) / np.float32(np.sqrt(f))
    router = rng.standard_normal((d, experts), np.float32) / np.float32(np.sqrt(d))
    return MoEWeights(router=jnp.asarray(router),
                      gate_up=_device_q(_quantized.quantize(gate_up, qtype)),
                      down=_device_q(_quantized.quantize(down, down_qtype)),
                      config=RouterConfig.mixtral(k=k))


def _device_q(q: Any) -> Any:
    return _quantized.QuantizedExperts(jax.device_put(np.asarray(q.data)), q.qtype, q.shape)


def _to_dense(w: Any, dtype: Any) -> Any:
    """Quantized experts decoded to a dense array (one expert at a time), dense ones cast."""
    if w is None:
        return None
    if not isinstance(w, _quantized.QuantizedExperts):
        return jnp.asarray(w).astype(dtype)
    data = np.asarray(w.data)
    out = np.empty(w.shape, jnp.dtype(dtype))
    for e in range(w.E):
        out[e] = _quantized.dequantize(_quantized.QuantizedExperts(data[e:e + 1], w.qtype, (1,) + w.shape[1:]))[0]
    return jnp.asarray(out)


def _replace(w: MoEWeights, **kw: Any) -> MoEWeights:
    fields = {name: getattr(w, name) for name in w.__dataclass_fields__}
    fields.update(kw)
    return MoEWeights(**fields)


def _all_quantized(w: MoEWeights) -> bool:
    return all(isinstance(getattr(w, n), _quantized.QuantizedExperts)
               for n in _EXPERTS if getattr(w, n) is not None)


def _format(w: MoEWeights) -> str:
    names = []
    for n in ("gate_up", "gate", "up", "down"):
        v = w.formats().get(n)
        v = {"bfloat16": "bf16", "float16": "f16"}.get(v, v)
        if v is not None and (not names or names[-1] != v):
            names.append(v)
    return "/".join(names)


def _device_for(kind: MoeKind) -> jax.Device:
    """A CUDA GPU when this build runs ``kind`` there, else the CPU."""
    if kind.name in build_info()["kinds"].get("cuda", []):
        try:
            return jax.devices("gpu")[0]
        except RuntimeError:
            pass
    return jax.devices("cpu")[0]


# -- the float64 reference ---------------------------------------------------------------------

class _Ref:
    """Experts decoded to float64 on demand (only those the tokens use)."""

    def __init__(self, w: Any, layout: str):
        self.w, self.layout, self.cache = w, layout, {}

    def __getitem__(self, e: int) -> np.ndarray:
        if e not in self.cache:
            w = self.w
            if isinstance(w, _quantized.QuantizedExperts):
                one = _quantized.QuantizedExperts(np.asarray(w.data)[e:e + 1], w.qtype, (1,) + w.shape[1:])
                m = _quantized.dequantize(one)[0]
            else:
                m = np.asarray(jnp.asarray(w)[e].astype(jnp.float32))
                m = m if self.layout == "enk" else m.T
            self.cache[e] = m.astype(np.float64)
        return self.cache[e]


def _act(name: Any, g: np.ndarray, u: np.ndarray) -> np.ndarray:
    if isinstance(name, GptOssActivation) or name == "gpt_oss":
        p = name if isinstance(name, GptOssActivation) else GptOssActivation()
        g = np.minimum(g, p.limit)
        u = np.clip(u, -p.limit, p.limit)
        return (u + 1) * g / (1 + np.exp(-p.alpha * g))
    if name == "swiglu":
        return g / (1 + np.exp(-g)) * u
    if name == "geglu":
        return 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3))) * u
    if name == "geglu_erf":
        return 0.5 * g * (1 + np.vectorize(math.erf)(g / np.sqrt(2))) * u
    if name == "reglu":
        return np.maximum(g, 0) * u
    raise ValueError(name)


def _ffn64(x: np.ndarray, ids: np.ndarray, scores: np.ndarray, gate_up: Any, down: Any,
           layout: str, act: Any, gate_up_bias: np.ndarray | None = None,
           down_bias: np.ndarray | None = None) -> np.ndarray:
    if isinstance(gate_up, tuple):
        g_ref, u_ref = _Ref(gate_up[0], layout), _Ref(gate_up[1], layout)
        rows = lambda e: np.concatenate([g_ref[e], u_ref[e]], 0)  # noqa: E731
    else:
        gu_ref = _Ref(gate_up, layout)
        rows = lambda e: gu_ref[e]  # noqa: E731
    d_ref = _Ref(down, layout)
    y = np.zeros((x.shape[0], d_ref[0].shape[0]))
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = rows(e) @ x[t]
            if gate_up_bias is not None:
                h = h + gate_up_bias[e]
            f = h.shape[0] // 2
            o = d_ref[e] @ _act(act, h[:f], h[f:])
            if down_bias is not None:
                o = o + down_bias[e]
            y[t] += scores[t, j] * o
    return y


def _reference(w: MoEWeights, x: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    biases = expert_bias_arrays(w)  # float32, in the layout of w's gate/up
    gub = biases.get("gate_up_bias")
    if gub is None and "gate_bias" in biases:
        gub = np.concatenate([np.asarray(biases["gate_bias"]), np.asarray(biases["up_bias"])], 1)
    y = _ffn64(x, ids, scores, w.experts_gate_up, w.down, w.weight_layout, w.activation,
               None if gub is None else np.asarray(gub, np.float64),
               np.asarray(biases["down_bias"], np.float64) if biases else None)
    sh = w.shared
    if sh is not None:
        gu = sh.gate_up
        if not isinstance(gu, tuple) and not isinstance(gu, _quantized.QuantizedExperts) and jnp.ndim(gu) == 2:
            gu = jnp.asarray(gu)[None]
        dn = sh.down if isinstance(sh.down, _quantized.QuantizedExperts) or jnp.ndim(sh.down) == 3 \
            else jnp.asarray(sh.down)[None]
        ys = _ffn64(x, np.zeros((x.shape[0], 1), np.int64), np.ones((x.shape[0], 1)), gu, dn,
                    w.weight_layout, w.activation)
        if sh.gate is not None:
            ys = ys / (1 + np.exp(-(x @ np.asarray(sh.gate, np.float64).reshape(-1))))[:, None]
        y = y + ys
    return y


# -- the job -----------------------------------------------------------------------------------

def _time_us(fn: Any, *args: Any, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def run(weights: MoEWeights, *, tokens: int, iters: int, seed: int, out: Any = None) -> list[dict]:
    """Run ``weights`` in each kind, print the table to ``out`` (default stdout); returns one
    dict per kind (kind, format, device, error, us, note)."""
    out = sys.stdout if out is None else out
    rng = np.random.default_rng(seed)
    # bfloat16-representable activations: every kind and its router see the same values.
    x32 = np.asarray(jnp.asarray(rng.standard_normal((tokens, weights.features)), jnp.bfloat16)
                     .astype(jnp.float32))
    block = jax.jit(lambda w, x: w(x, return_routing=True))
    rows = []
    dense = None
    for kind in KINDS:
        if kind == MoeKind.WMMA:
            if dense is None:
                dense = _replace(weights, **{n: _to_dense(getattr(weights, n), jnp.bfloat16)
                                             for n in _EXPERTS})
            w, x = dense, x32.astype(jnp.bfloat16)
        else:
            if not _all_quantized(weights):
                rows.append(dict(kind=kind.name, format=_format(weights), device="-", error=None,
                                 us=None, note="needs GGUF-quantized experts"))
                continue
            w = weights
            x = x32 if kind == MoeKind.SCALAR_GGUF else x32.astype(jnp.bfloat16)
        device = _device_for(kind)
        w_dev, x_dev = jax.device_put((w, jnp.asarray(x)), device)
        y, (ids, scores) = block(w_dev, x_dev)
        ref = _reference(w, x32.astype(np.float64), np.asarray(ids), np.asarray(scores, np.float64))
        err = float(np.abs(np.asarray(y.astype(jnp.float32), np.float64) - ref).max() / np.abs(ref).max())
        us = _time_us(block, w_dev, x_dev, iters=iters)
        rows.append(dict(kind=kind.name, format=_format(w), device=f"{device.platform}:{device.id}",
                         error=err, us=us, note=""))
    print(f"{'kind':<12} {'format':<16} {'device':<8} {'max err':>9} {'us/call':>10}", file=out)
    for r in rows:
        err = "-" if r["error"] is None else f"{r['error']:.2e}"
        us = "-" if r["us"] is None else f"{r['us']:.1f}"
        flag = "" if r["error"] is None or r["error"] <= MAX_ERROR else "  FAILED"
        print(f"{r['kind']:<12} {r['format']:<16} {r['device']:<8} {err:>9} {us:>10}"
              f"{flag}{('  ' + r['note']) if r['note'] else ''}", file=out)
    print(f"max err: max |out - ref| / max |ref|, ref = float64 expert FFN of the same weights and "
          f"routing; pass <= {MAX_ERROR:.2e}", file=out)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m jax_moe``; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m jax_moe", description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", metavar="FILE", help="a GGUF checkpoint (default: a random block)")
    p.add_argument("--block", type=int, default=None, help="block index in --gguf (default: the first MoE block)")
    p.add_argument("--tokens", type=int, default=16, help="tokens per call (default 16)")
    p.add_argument("--iters", type=int, default=20, help="timed calls per kind (default 20)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")
    p.add_argument("--qtype", default="Q4_K", help="random block: format of the experts (default Q4_K)")
    p.add_argument("--down-qtype", default=None, help="random block: format of down (default --qtype)")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.iters < 1:
        p.error("--tokens and --iters must be >= 1")
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)

    import jax_moe

    if args.gguf is None:
        if args.block is not None:
            p.error("--block needs --gguf")
        e, k, d, f = 8, 2, 512, 1024
        try:
            weights = _random_block(rng, experts=e, k=k, d=d, f=f, qtype=args.qtype,
                                    down_qtype=args.down_qtype or args.qtype)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"jax_moe {jax_moe.__version__}: Mixtral-style MoE block with random weights, "
              f"E={e} k={k} D={d} F={f}, {args.tokens} tokens (seed {seed})")
    else:
        try:
            from . import gguf as _gguf
        except ImportError as exc:
            print(f"--gguf needs the gguf package ({exc})", file=sys.stderr)
            return 2
        try:
            cfg = _gguf.read_moe_config(args.gguf)
            block = cfg.moe_blocks[0] if args.block is None else args.block
            weights = _gguf.load_block_weights(args.gguf, block)
        except (ValueError, TypeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        r = cfg.router
        print(f"jax_moe {jax_moe.__version__}: {cfg.arch} block {block} of {args.gguf}, "
              f"E={weights.num_experts} k={r.k} D={weights.features} F={weights.hidden_features}"
              f"{'' if weights.shared is None else f' shared Fs={weights.shared_hidden_features}'}, "
              f"routing {r.gating}{' renormalized' if r.normalize else ''}"
              f"{f' x{r.scale:g}' if r.scale != 1 else ''}"
              f"{f' groups {r.n_groups_used}/{r.n_groups}' if r.n_groups > 1 else ''}, "
              f"{args.tokens} tokens (seed {seed})")
    rows = run(weights, tokens=args.tokens, iters=args.iters, seed=seed)
    ok = all(r["error"] is None or r["error"] <= MAX_ERROR for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
