"""Independent NumPy float64 references for the tests (no jax_moe code is used here)."""

from __future__ import annotations

import gguf
import ml_dtypes
import numpy as np

DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}

# (elements per block, bytes per block, byte offsets of the fp16 scale fields)
BLOCKS = {
    "Q8_0": (32, 34, (0,)),
    "Q2_K": (256, 84, (80, 82)),
    "Q3_K": (256, 110, (108,)),
    "Q4_K": (256, 144, (0, 2)),
    "Q5_K": (256, 176, (0, 2)),
    "Q6_K": (256, 210, (208,)),
    "MXFP4": (32, 17, ()),
}
FORMATS = tuple(BLOCKS)
# byte offsets of the E8M0 scale fields (2^(e - 127)), for the formats that have them
E8M0 = {"MXFP4": (0,)}


def gguf_type(name: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[name]


def round_to(a: np.ndarray, dtype_name: str) -> np.ndarray:
    """Round float values to dtype_name's precision and return them as float64."""
    return np.asarray(a, np.float32).astype(DTYPES[dtype_name]).astype(np.float64)


def random_blocks(rng: np.random.Generator, fmt: str, shape: tuple[int, ...], scale: float = 0.02) -> np.ndarray:
    """Random bytes for blocks of `fmt` with finite fp16 scales of about `scale` (E8M0 scales:
    powers of two around `scale`, so that the values stay finite): uint8 [*shape, n_blocks * bytes]."""
    qk, bb, offsets = BLOCKS[fmt]
    *lead, nblocks = shape
    raw = rng.integers(0, 256, size=(*lead, nblocks, bb), dtype=np.uint8)
    for off in offsets:
        h = (rng.standard_normal((*lead, nblocks)) * scale).astype(np.float16)
        raw[..., off:off + 2] = h.view(np.uint8).reshape(*lead, nblocks, 2)
    for off in E8M0.get(fmt, ()):
        mag = np.abs(rng.standard_normal((*lead, nblocks))) * scale + 1e-30
        raw[..., off] = np.clip(np.round(np.log2(mag)) + 127, 1, 254).astype(np.uint8)
    return raw.reshape(*lead, nblocks * bb)


def gguf_decode(data: np.ndarray, fmt: str, K: int) -> np.ndarray:
    """Decode with the gguf package (the oracle): float32 [..., K]."""
    lead = data.shape[:-1]
    flat = data.reshape(-1, data.shape[-1])
    out = gguf.quants.dequantize(flat, gguf_type(fmt))
    return np.asarray(out, np.float32).reshape(*lead, K)


def stage_q8_1(x: np.ndarray) -> np.ndarray:
    """SCALAR_GGUF's activation staging, written from docs/contract.md §4: float64 of q * f16(d)."""
    x = np.asarray(x, np.float32)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(d == 0, np.float32(0), blocks / np.where(d == 0, np.float32(1), d)).astype(np.float32)
    q = np.sign(v) * np.floor(np.abs(v).astype(np.float64) + 0.5)  # half away from zero
    d16 = d.astype(np.float16).astype(np.float64)
    return (q * d16).reshape(x.shape)


def moe_reference(x, ids, w, scores, reduce: bool) -> np.ndarray:
    """float64 MoE projection. x [T, K] or [T, k, K]; ids [T, k]; w [E, N, K]; scores [T, k]."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    scores = np.asarray(scores, np.float64)
    T, k = ids.shape
    E, N, _ = w.shape
    out = np.zeros((T, k, N))
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            if 0 <= e < E:
                row = x[t, j] if x.ndim == 3 else x[t]
                out[t, j] = scores[t, j] * (w[e] @ row)
    return out.sum(axis=1) if reduce else out


def rel_err(out, ref) -> float:
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0))


# -- the expert FFN (moe_ffn) ---------------------------------------------------------------------
F32 = np.dtype(np.float32)

def gpt_oss_act(g, u, alpha: float = 1.702, limit: float = 7.0):
    """gpt-oss's clamped SwiGLU, written from Hugging Face's GptOssExperts."""
    g = np.minimum(g, limit)
    u = np.clip(u, -limit, limit)
    return (u + 1) * g / (1 + np.exp(-alpha * g))


ACTIVATIONS = {
    "swiglu": lambda g, u: g / (1 + np.exp(-g)) * u,
    "geglu": lambda g, u: 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3))) * u,
    "gpt_oss": gpt_oss_act,
}


def _quantized(w) -> bool:
    return hasattr(w, "qtype") and hasattr(w, "data")  # a QuantizedExperts, by its fields


def _round(a, dtype) -> np.ndarray:
    return round_to(a, np.dtype(dtype).name)


def weight_as_seen(w, x_dtype, layout: str = "enk") -> np.ndarray:
    """float64 [E, N, K] as the kernel uses it: dense as stored; quantized decoded by gguf (and
    rounded to the activation dtype for WMMA_GGUF)."""
    if _quantized(w):
        d = gguf_decode(np.asarray(w.data), w.qtype.name, w.shape[2]).astype(np.float64)
        return d if np.dtype(x_dtype) == F32 else _round(d, x_dtype)
    w = np.asarray(w).astype(np.float64)
    return w if layout == "enk" else np.swapaxes(w, 1, 2)


def _stage(a, w, x_dtype) -> np.ndarray:
    """The input of a projection: q8_1 for SCALAR_GGUF, the compute dtype's values otherwise."""
    if _quantized(w):
        return stage_q8_1(a) if np.dtype(x_dtype) == F32 else _round(a, x_dtype)
    return _round(a, w.dtype)


def _out_of(w, x_dtype) -> np.dtype:
    """Dtype a gate/up projection writes."""
    return np.dtype(x_dtype) if _quantized(w) else np.dtype(w.dtype)


def ffn_reference(x, ids, scores, gate, up, down, *, act="swiglu", layout: str = "enk",
                  shared=None, out_dtype=None, gate_bias=None, up_bias=None, down_bias=None):
    """float64 reference of the expert FFN (jax_moe.moe_ffn) as its kernels compute it.

    x [T, D]; ids, scores [T, k]; gate, up [E, F, D] and down [E, D, F] as passed to moe_ffn
    (dense arrays in ``layout``, or QuantizedExperts); ``shared``: None or (gate, up, down,
    gate_weight [D] or None) with E = 1. Each projection's input is staged and its output
    rounded as the kind does (§4 of docs/contract.md); the activation (a name of ACTIVATIONS or
    a callable) runs in float32. Optional expert biases gate_bias, up_bias [E, F] and down_bias
    [E, D] are added (in float64) to the gate/up outputs and to each pair's down output before its
    score; pairs with ids outside [0, E) are skipped. Returns (y float64 [T, D], out_dtype).
    """
    x_dtype = np.dtype(np.asarray(x).dtype)
    x = np.asarray(x).astype(np.float32).astype(np.float64)
    ids, scores = np.asarray(ids), np.asarray(scores, np.float64)
    out_dtype = np.dtype(out_dtype or x_dtype)

    act_fn = ACTIVATIONS[act] if isinstance(act, str) else act

    def expert_ffn(xrows, ids_, wg, wu, wd, sc, gb=None, ub=None, db=None):
        g_w, u_w, d_w = (weight_as_seen(w, x_dtype, layout) for w in (wg, wu, wd))
        xg, xu = _stage(xrows, wg, x_dtype), _stage(xrows, wu, x_dtype)
        T, k = ids_.shape
        y = np.zeros((T, d_w.shape[1]))
        for t in range(T):
            for j in range(k):
                e = ids_[t, j]
                if not 0 <= e < d_w.shape[0]:
                    continue
                g = _round(g_w[e] @ xg[t], _out_of(wg, x_dtype))
                u = _round(u_w[e] @ xu[t], _out_of(wu, x_dtype))
                if gb is not None:
                    g = g + np.asarray(gb, np.float64)[e]
                if ub is not None:
                    u = u + np.asarray(ub, np.float64)[e]
                h = _round(act_fn(g, u), F32)
                o = d_w[e] @ _stage(h, wd, x_dtype)
                if db is not None:
                    o = o + np.asarray(db, np.float64)[e]
                y[t] += sc[t, j] * o
        return y

    y = expert_ffn(x, ids, gate, up, down, scores, gate_bias, up_bias, down_bias)
    if shared is not None:
        sg, su, sd, gate_w = shared
        ys = expert_ffn(x, np.zeros((x.shape[0], 1), np.int64), sg, su, sd, np.ones((x.shape[0], 1)))
        if gate_w is not None:
            ys = ys / (1 + np.exp(-(x @ np.asarray(gate_w, np.float64))))[:, None]
        y = y + ys
    return y, out_dtype
