"""GGUF checkpoints: MoE metadata and expert tensors into ready MoE blocks.

::

    import jax_moe.gguf

    cfg = jax_moe.gguf.read_moe_config("Qwen3-30B-A3B-Q4_K_M.gguf")  # E, k, routing, MoE blocks
    w = jax_moe.gguf.load_block_weights("Qwen3-30B-A3B-Q4_K_M.gguf", 0)  # a jax_moe.ffn.MoEWeights
    blocks = jax_moe.gguf.load_blocks("Qwen3-30B-A3B-Q4_K_M.gguf")       # {block: MoEWeights}, progress bar
    moe = jax_moe.nnx.MoE.from_gguf("Qwen3-30B-A3B-Q4_K_M.gguf", 0)      # the modules build themselves

GGUF files are untrusted input: :mod:`jax_moe.gguf_file` reads them (every count, length and
offset checked, tensors placed by ggml's rule, big-endian files byte-swapped), and the MoE
metadata and tensors are checked against each other here before any byte is copied.

The file is memory-mapped. Expert tensors in a format jax_moe runs
(Q8_0, Q2_K..Q6_K, MXFP4; F16/BF16 dense) are used as stored, ``[E, N, K]`` in numpy order:
their bytes are copied once, from the mapped file into the array the module holds (gate and up
are written straight into one fused gate+up buffer when they share a format). Other formats
(IQ*, Q4_0, ...) are decoded with ``gguf.quants`` to bfloat16 with a warning naming the
tensor, or rejected with a ValueError when ``gguf`` cannot decode them either.

Tensors of block N: ``blk.N.ffn_gate_inp.weight`` (router ``[E, D]``, transposed to ``[D, E]``),
``blk.N.ffn_gate_inp.bias``, ``blk.N.exp_probs_b.bias`` (selection bias),
``blk.N.ffn_{gate,up,down}_exps.weight`` or ``blk.N.ffn_gate_up_exps.weight`` with their
optional expert biases ``.bias`` (``[E, F]``, ``[E, D]``, ``[E, 2F]``; gpt-oss has them), and the
shared expert ``blk.N.ffn_{gate,up,down}_shexp.weight`` with ``blk.N.ffn_gate_inp_shexp.weight``.

Metadata: ``{arch}.expert_count``, ``expert_used_count``, ``expert_weights_norm``,
``expert_weights_scale``, ``expert_gating_func``, ``expert_group_count``,
``expert_group_used_count``, ``swiglu_clamp_exp`` (gpt-oss's clamp, per block); where a file
lacks a key, the architecture's llama.cpp default.

gpt-oss (architecture ``gpt-oss``, as llama.cpp writes it): MXFP4 experts kept as stored, expert
biases, the router's bias, top-k-then-softmax routing and the clamped SwiGLU
(:class:`jax_moe.ffn.GptOssActivation`: alpha 1.702, limit 7, or the file's
``gpt-oss.swiglu_clamp_exp`` for the block).

Requires the ``gguf`` package (and ``tqdm`` for progress bars), optional dependencies of jax_moe.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from . import quantized as _quantized
from ._extras import require
from .ffn import ACTIVATIONS, GptOssActivation, MoEWeights
from .kinds import DENSE_DTYPES, QUANTIZED_TYPES, GGMLType
from .routing import RouterConfig

_gguf = require("gguf", "gguf", "jax_moe.gguf")
_KEYS = _gguf.Keys
_LLM = _gguf.Keys.LLM


def _block_tensor(t: Any) -> str:
    """gguf's name of a per-block tensor without its ``blk.N.`` prefix (``ffn_gate_exps``)."""
    return _gguf.TENSOR_NAMES[t].format(bid=0)[len("blk.0."):]


_T = _gguf.MODEL_TENSOR
_EXPS = {"gate": _block_tensor(_T.FFN_GATE_EXP), "up": _block_tensor(_T.FFN_UP_EXP),
         "down": _block_tensor(_T.FFN_DOWN_EXP), "gate_up": _block_tensor(_T.FFN_GATE_UP_EXP)}
_SHEXP = {"gate": _block_tensor(_T.FFN_GATE_SHEXP), "up": _block_tensor(_T.FFN_UP_SHEXP),
          "down": _block_tensor(_T.FFN_DOWN_SHEXP)}
_ROUTER = _block_tensor(_T.FFN_GATE_INP)
_SHARED_GATE = _block_tensor(_T.FFN_GATE_INP_SHEXP)
_SELECTION_BIAS = _block_tensor(_T.FFN_EXP_PROBS_B)

from .gguf_file import _MAX_EXPERTS, GGUFError, _field, _int_field, _reader, _type_name  # noqa: E402

__all__ = [
    "GGUFError",
    "GGUFMoEConfig",
    "load_block_weights",
    "load_blocks",
    "read_moe_config",
]

_QT = _gguf.GGMLQuantizationType
_RUNS = {int(t) for t in QUANTIZED_TYPES}  # GGUF formats moe_matmul runs as they are
_DENSE = {int(_QT.F16): np.dtype(np.float16), int(_QT.BF16): np.dtype(ml_dtypes.bfloat16),
          int(_QT.F32): np.dtype(np.float32)}
_INTEGER = {int(_QT.I8), int(_QT.I16), int(_QT.I32), int(_QT.I64)}  # never weights

# llama.cpp's per-architecture routing where the file carries no metadata
# (gating, renormalize the top-k weights).
_ARCH_ROUTING: dict[str, tuple[str, bool]] = {
    "llama": ("softmax", True),       # Mixtral GGUFs use the llama architecture
    "mixtral": ("softmax", True),
    "qwen2moe": ("softmax", False),
    "qwen3moe": ("softmax", True),
    "qwen3vlmoe": ("softmax", True),
    "olmoe": ("softmax", False),
    "deepseek2": ("softmax", False),  # V2/V2.5 files; V3/Kimi-K2 files carry the metadata
    "glm4moe": ("sigmoid", True),
    "gpt-oss": ("topk_softmax", False),
}
_GATING_FUNC = {1: "softmax", 2: "sigmoid", 3: "topk_softmax"}  # llama_expert_gating_func_type
# The experts' activation where it is not SwiGLU (llama.cpp's per-architecture choice).
_ARCH_ACTIVATION: dict[str, str] = {"gpt-oss": "gpt_oss"}
_UNSUPPORTED_ARCH = {
    "llama4": "llama4 applies the routing weight to the experts' input (before the FFN), which "
              "jax_moe.ffn.moe_ffn does not implement",
    "grovemoe": "grovemoe's adjugate experts are not implemented by jax_moe.ffn.moe_ffn",
}
# ffn_{gate,up,down,gate_up}_exps (stacked experts), or the legacy one tensor per expert
# (ffn_{gate,up,down}.{e}.weight, early Mixtral files)
_EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_(?:(?:gate_up|gate|up|down)_exps|(?:gate|up|down)\.\d+)\.weight$")


@dataclasses.dataclass(frozen=True)
class GGUFMoEConfig:
    """The MoE hyperparameters of a GGUF checkpoint.

    Attributes:
      arch: ``general.architecture`` (``"qwen3moe"``, ``"deepseek2"``, ``"llama"``, ...).
      block_count: transformer blocks (``{arch}.block_count``), or None.
      expert_count: E. ``expert_used_count``: k.
      embedding_length: D (``{arch}.embedding_length``), or None.
      expert_feed_forward_length: F (``{arch}.expert_feed_forward_length``), or None.
      expert_shared_count: shared experts (0 if absent).
      router: the :class:`RouterConfig` (gating, renormalization, scale, groups).
      activation: the expert activation name (``"gpt_oss"`` for gpt-oss, whose clamp
        ``load_block_weights`` reads per block), or the callable passed as ``activation``.
      moe_blocks: indices of the blocks that hold expert tensors, ascending.
    """

    arch: str
    block_count: int | None
    expert_count: int
    expert_used_count: int
    embedding_length: int | None
    expert_feed_forward_length: int | None
    expert_shared_count: int
    router: RouterConfig
    activation: Any
    moe_blocks: tuple[int, ...]


def read_moe_config(source: str | os.PathLike | _gguf.GGUFReader, *,
                    router: RouterConfig | None = None,
                    activation: str | None = None) -> GGUFMoEConfig:
    """Read the MoE hyperparameters of a GGUF file (path or ``gguf.GGUFReader``).

    ``router``/``activation`` override what the file says (or what its architecture implies).
    Raises ValueError for a file without experts or with inconsistent routing metadata.
    """
    reader = _reader(source)
    arch = _field(reader, _KEYS.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise GGUFError(f"not a model GGUF file: {_KEYS.General.ARCHITECTURE} is missing")
    key = lambda name: name.format(arch=arch)  # noqa: E731  (gguf.Keys.LLM.* are "{arch}.<name>")
    n_expert = _int_field(reader, key(_LLM.EXPERT_COUNT), 0, _MAX_EXPERTS)
    if not n_expert:
        raise GGUFError(f"{arch} checkpoint has no experts ({key(_LLM.EXPERT_COUNT)} is missing or 0)")
    k = _int_field(reader, key(_LLM.EXPERT_USED_COUNT), 0, n_expert)
    if not k:
        raise GGUFError(f"{key(_LLM.EXPERT_USED_COUNT)} is missing or 0")
    moe_blocks = sorted({int(m.group(1)) for t in reader.tensors
                         if (m := _EXPERT_TENSOR.match(t.name))})

    if router is None:
        gating, norm = _ARCH_ROUTING.get(arch, (None, None))
        func = _int_field(reader, key(_LLM.EXPERT_GATING_FUNC), 0)
        if func is not None:
            if int(func) not in _GATING_FUNC:
                raise GGUFError(f"{key(_LLM.EXPERT_GATING_FUNC)} = {func} is not a known gating "
                                 f"function (1 softmax, 2 sigmoid)")
            gating = _GATING_FUNC[int(func)]
        file_norm = _field(reader, key(_LLM.EXPERT_WEIGHTS_NORM))
        if file_norm is not None:
            if not isinstance(file_norm, (bool, int, np.integer)):
                raise GGUFError(f"metadata {key(_LLM.EXPERT_WEIGHTS_NORM)} must be a bool; the file has {file_norm!r}")
            norm = bool(file_norm)
        if gating is None or norm is None:
            warnings.warn(f"jax_moe.gguf: no routing defaults known for architecture {arch!r}; using "
                          f"gating={gating or 'softmax'!r}, normalize={bool(norm)} (pass router= to "
                          f"override)", stacklevel=2)
            gating, norm = gating or "softmax", bool(norm)
        scale = _field(reader, key(_LLM.EXPERT_WEIGHTS_SCALE))
        if scale is not None and (isinstance(scale, (bool, str, list)) or not math.isfinite(float(scale))):
            raise GGUFError(f"metadata {key(_LLM.EXPERT_WEIGHTS_SCALE)} must be a finite number; the file has {scale!r}")
        scale = 1.0 if not scale else float(scale)
        groups = _int_field(reader, key(_LLM.EXPERT_GROUP_COUNT), 0, n_expert) or 1
        used = _int_field(reader, key(_LLM.EXPERT_GROUP_USED_COUNT), 0, groups) or groups
        if n_expert % groups:
            raise GGUFError(f"metadata {key(_LLM.EXPERT_GROUP_COUNT)} = {groups} does not divide "
                            f"{key(_LLM.EXPERT_COUNT)} = {n_expert}")
        router = RouterConfig(k=int(k), gating=gating, normalize=norm, scale=scale,
                              n_groups=groups, n_groups_used=used)
    elif not isinstance(router, RouterConfig):
        raise TypeError(f"router must be a RouterConfig or None; got {type(router).__name__}")
    if activation is None:
        activation = _ARCH_ACTIVATION.get(arch, "swiglu")
    elif not callable(activation) and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)} or a callable; got {activation!r}")

    def opt_int(name: str) -> int | None:
        return _int_field(reader, key(name), 0)

    return GGUFMoEConfig(
        arch=arch, block_count=opt_int(_LLM.BLOCK_COUNT), expert_count=int(n_expert),
        expert_used_count=int(k), embedding_length=opt_int(_LLM.EMBEDDING_LENGTH),
        expert_feed_forward_length=opt_int(_LLM.EXPERT_FEED_FORWARD_LENGTH),
        expert_shared_count=opt_int(_LLM.EXPERT_SHARED_COUNT) or 0, router=router,
        activation=activation, moe_blocks=tuple(moe_blocks))


# -- tensors -------------------------------------------------------------------------------------

def _shape(t: Any) -> tuple[int, ...]:
    """A tensor's logical shape in numpy order (GGUF stores it reversed)."""
    return tuple(int(s) for s in reversed([int(d) for d in t.shape]))


@dataclasses.dataclass
class _Host:
    """An expert tensor on the host, before it is put on the device."""

    name: str
    shape: tuple[int, int, int]  # (E, N, K)
    qtype: GGMLType | None       # quantized format, or None for dense
    data: np.ndarray             # uint8 [E, N, bytes] (a view of the mapped file) or dense [E, N, K]


def _not_integer(t: Any) -> None:
    if int(t.tensor_type) in _INTEGER:
        raise GGUFError(f"{t.name}: tensor type {_type_name(t)} is an integer type; weights must be "
                        f"F32, F16, BF16 or a GGUF block format")


def _host_experts(t: Any, dense_dtype: np.dtype, *, leading_one: bool = False) -> _Host:
    shape = _shape(t)
    data = t.data
    if leading_one:  # a shared expert's 2-d tensor as one expert
        if len(shape) != 2:
            raise GGUFError(f"{t.name}: expected a 2-d tensor, got shape {list(shape)}")
        shape, data = (1,) + shape, data.reshape((1,) + tuple(data.shape))
    if len(shape) != 3:
        raise GGUFError(f"{t.name}: expected a 3-d expert tensor [E, N, K], got shape {list(shape)}")
    qt = int(t.tensor_type)
    _not_integer(t)
    if qt in _RUNS:
        return _Host(t.name, shape, GGMLType(qt), data)
    if qt in _DENSE:
        arr = data.view(_DENSE[qt]).reshape(shape) if qt == int(_QT.BF16) else data.reshape(shape)
        if arr.dtype != dense_dtype:
            arr = arr.astype(dense_dtype)
        return _Host(t.name, shape, None, arr)
    # A format jax_moe does not run: decode it with gguf, one expert at a time.
    try:
        out = np.empty(shape, dense_dtype)
        for e in range(shape[0]):
            out[e] = _gguf.quants.dequantize(data[e], _QT(qt)).reshape(shape[1:])
    except NotImplementedError:
        raise GGUFError(
            f"{t.name}: tensor type {_type_name(t)} is not a format jax_moe runs (Q8_0, Q2_K..Q6_K, MXFP4, "
            f"F16, BF16, F32), and gguf {getattr(_gguf, '__version__', '')} cannot decode it "
            f"either") from None
    warnings.warn(f"jax_moe.gguf: {t.name} is {_type_name(t)}, a format jax_moe does not run; "
                  f"decoded to {dense_dtype.name} ({out.nbytes / 2**20:.1f} MiB)", stacklevel=3)
    return _Host(t.name, shape, None, out)


def _device(h: _Host, *, owned: bool = False) -> Any:
    """Put a host tensor on the default device: one copy (none more when ``owned`` and the
    device is the host)."""
    arr = jax.device_put(h.data, may_alias=True) if owned else jax.device_put(np.ascontiguousarray(h.data), may_alias=False)
    if h.qtype is None:
        return arr
    return _quantized.QuantizedExperts(arr, h.qtype, h.shape)


def _owned(h: _Host) -> bool:
    """Whether ``h.data`` is an array of ours (decoded/converted), not a view of the file."""
    return not isinstance(h.data, np.memmap) and h.data.base is None


def _fuse(g: _Host, u: _Host) -> _Host | None:
    """Gate and up written into one [E, 2F, K] buffer, or None if their formats differ."""
    if g.shape != u.shape or g.qtype != u.qtype or g.data.dtype != u.data.dtype:
        return None
    E, F, K = g.shape
    buf = np.empty((E, 2 * F) + tuple(g.data.shape[2:]), g.data.dtype)
    buf[:, :F] = g.data
    buf[:, F:] = u.data
    return _Host(f"{g.name}+{u.name}", (E, 2 * F, K), g.qtype, buf)


def _to_f32(t: Any) -> np.ndarray:
    qt = int(t.tensor_type)
    _not_integer(t)
    if qt in _DENSE or qt == int(_QT.F64):
        data = t.data.view(_DENSE[qt]) if qt == int(_QT.BF16) else t.data
        return np.asarray(data, np.float32).reshape(_shape(t))
    try:
        return _gguf.quants.dequantize(t.data, _QT(qt)).astype(np.float32).reshape(_shape(t))
    except NotImplementedError:
        raise GGUFError(f"{t.name}: gguf cannot decode tensor type {_type_name(t)}") from None


def _swiglu_limit(reader: _gguf.GGUFReader, arch: str, block: int) -> float | None:
    """The clamp of block ``block``'s clamped SwiGLU from ``{arch}.swiglu_clamp_exp`` (one value
    per block, or one for all; 0 means no clamp, as in llama.cpp), or None where absent."""
    key = _LLM.SWIGLU_CLAMP_EXP.format(arch=arch)
    v = _field(reader, key)
    if v is None:
        return None
    values = list(v) if isinstance(v, (list, tuple)) else [v]
    if not values:
        return None
    if len(values) > 1 and block >= len(values):
        raise GGUFError(f"metadata {key} has {len(values)} values (one per block); block {block} has none")
    value = values[block] if len(values) > 1 else values[0]
    if isinstance(value, (bool, str)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)) or float(value) < 0:
        raise GGUFError(f"metadata {key} must hold finite numbers >= 0; the file has {value!r}")
    return float(value) if float(value) > 0 else math.inf


def load_block_weights(
    source: str | os.PathLike | _gguf.GGUFReader,
    block: int,
    *,
    router: RouterConfig | None = None,
    activation: str | None = None,
    dense_dtype: Any = jnp.bfloat16,
    fuse: bool = True,
    _index: Mapping[str, Any] | None = None,
    _config: GGUFMoEConfig | None = None,
) -> MoEWeights:
    """The MoE weights of block ``block`` of a GGUF checkpoint, on the default device.

    Args:
      source: path of the GGUF file, or an open ``gguf.GGUFReader``.
      block: the block index N (``blk.N.*``).
      router, activation: override the file's routing / activation (see :func:`read_moe_config`);
        gpt-oss's ``"gpt_oss"`` takes the block's clamp from ``swiglu_clamp_exp`` where the file
        has it (pass a :class:`jax_moe.ffn.GptOssActivation` to set it yourself).
      dense_dtype: dtype of dense (F16/BF16/F32) and decoded expert weights: bfloat16 or float16.
      fuse: write ``ffn_gate_exps`` and ``ffn_up_exps`` into one fused gate+up weight when they
        share a format (one moe_matmul call instead of two).

    Returns:
      A :class:`jax_moe.ffn.MoEWeights` in GGUF's ``[E, N, K]`` layout (``weight_layout="enk"``).
    """
    reader = _reader(source)
    arch = _field(reader, _KEYS.General.ARCHITECTURE)
    if arch in _UNSUPPORTED_ARCH:
        raise ValueError(f"block {block}: {_UNSUPPORTED_ARCH[arch]}")
    cfg = _config or read_moe_config(reader, router=router, activation=activation)
    dense_dtype = np.dtype(dense_dtype)
    if dense_dtype not in DENSE_DTYPES:
        raise TypeError(f"dense_dtype must be bfloat16 or float16; got {dense_dtype}")
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)):
        raise TypeError(f"block must be an int; got {block!r}")
    index = _index if _index is not None else {t.name: t for t in reader.tensors}
    prefix = f"blk.{int(block)}."
    get = lambda name: index.get(prefix + name)  # noqa: E731

    def experts(name: str) -> _Host | None:
        """``ffn_{name}_exps.weight``, or the legacy per-expert tensors (``ffn_{name}.{e}.weight``,
        which gguf's TENSOR_NAMES does not name) stacked into one buffer."""
        t = get(f"{_EXPS[name]}.weight")
        if t is not None:
            return _host_experts(t, dense_dtype)
        if get(f"ffn_{name}.0.weight") is None:
            return None
        parts = []
        for e in range(cfg.expert_count):
            te = get(f"ffn_{name}.{e}.weight")
            if te is None:
                raise GGUFError(f"{prefix}ffn_{name}.{e}.weight is missing ({cfg.expert_count} experts)")
            parts.append(_host_experts(te, dense_dtype, leading_one=True))
        first = parts[0]
        if any((h.shape, h.qtype, h.data.dtype) != (first.shape, first.qtype, first.data.dtype) for h in parts):
            raise GGUFError(f"{prefix}ffn_{name}.*.weight: the experts differ in shape or format")
        buf = np.empty((len(parts),) + tuple(first.data.shape[1:]), first.data.dtype)
        for e, h in enumerate(parts):
            buf[e] = h.data[0]
        return _Host(f"{prefix}ffn_{name}.*.weight", (len(parts),) + first.shape[1:], first.qtype, buf)

    if get(f"{_EXPS['down']}.weight") is None and get("ffn_down.0.weight") is None:
        if int(block) in cfg.moe_blocks:
            found = sorted(n for n in index if n.startswith(prefix) and _EXPERT_TENSOR.match(n))
            raise GGUFError(f"block {block}: {prefix}{_EXPS['down']}.weight is missing, but the block has "
                            f"the expert tensors {found}: the file is incomplete or a tensor name is corrupt")
        raise ValueError(f"block {block} has no expert tensors ({prefix}{_EXPS['down']}.weight not "
                         f"found); the MoE blocks of this file are {list(cfg.moe_blocks)}")
    unsupported = sorted(n for n in index if n.startswith(prefix) and
                         re.match(r"ffn_\w*(_exps|_shexp)\.(?!weight$)", n[len(prefix):]) and
                         not re.match(r"ffn_(gate_up|gate|up|down)_exps\.bias$", n[len(prefix):]))
    if unsupported:
        raise ValueError(f"block {block}: expert tensors {unsupported} (shared-expert biases or "
                         f"scales of experts) are not supported by jax_moe")

    dn = experts("down")
    E, D, F = dn.shape
    if E != cfg.expert_count:
        raise GGUFError(f"{dn.name}: {E} experts, but the file says expert_count = {cfg.expert_count}")
    if cfg.embedding_length is not None and D != cfg.embedding_length:
        raise GGUFError(f"{dn.name}: [E, D, F] has D = {D}, but the file says embedding_length = "
                        f"{cfg.embedding_length}")
    if cfg.expert_feed_forward_length is not None and F != cfg.expert_feed_forward_length:
        raise GGUFError(f"{dn.name}: [E, D, F] has F = {F}, but the file says expert_feed_forward_length = "
                        f"{cfg.expert_feed_forward_length}")
    gate_up = gate = up = None
    if get(f"{_EXPS['gate_up']}.weight") is not None:
        gate_up = _host_experts(get(f"{_EXPS['gate_up']}.weight"), dense_dtype)
        if gate_up.shape != (E, 2 * F, D):
            raise GGUFError(f"{gate_up.name}: expected [E, 2F, D] = {[E, 2 * F, D]}, got {list(gate_up.shape)}")
    else:
        gate, up = experts("gate"), experts("up")
        if gate is None or up is None:
            raise GGUFError(f"block {block}: needs {prefix}{_EXPS['gate_up']}.weight or both "
                             f"{prefix}{_EXPS['gate']}.weight and {prefix}{_EXPS['up']}.weight")
        for h in (gate, up):
            if h.shape != (E, F, D):
                raise GGUFError(f"{h.name}: expected [E, F, D] = {[E, F, D]}, got {list(h.shape)}")
        if fuse and (fused := _fuse(gate, up)) is not None:
            gate_up, gate, up = fused, None, None

    def expert_bias(name: str, shape: tuple[int, int]) -> np.ndarray | None:
        """``ffn_{name}_exps.bias`` as float32 ``shape``, or None."""
        t = get(f"{_EXPS[name]}.bias")
        if t is None:
            return None
        v = _to_f32(t)
        if v.shape != shape:
            raise GGUFError(f"{t.name}: expected {list(shape)} (one bias row per expert), got {list(v.shape)}")
        return v

    gu_bias, g_bias, u_bias = expert_bias("gate_up", (E, 2 * F)), expert_bias("gate", (E, F)), expert_bias("up", (E, F))
    dn_bias = expert_bias("down", (E, D))
    if gate_up is not None and gu_bias is None and (g_bias is not None or u_bias is not None):
        zeros = np.zeros((E, F), np.float32)  # gate and up fused: so are their biases
        gu_bias = np.concatenate([zeros if g_bias is None else g_bias, zeros if u_bias is None else u_bias], 1)
        g_bias = u_bias = None
    biases = {name: None if v is None else jnp.asarray(v) for name, v in
              (("gate_up_bias", gu_bias), ("gate_bias", g_bias), ("up_bias", u_bias), ("down_bias", dn_bias))}

    activation_fn = cfg.activation
    if isinstance(activation_fn, str) and activation_fn == "gpt_oss":
        limit = _swiglu_limit(reader, cfg.arch, int(block))
        if limit is not None:
            activation_fn = GptOssActivation(limit=limit)

    t_router = get(f"{_ROUTER}.weight")
    if t_router is None:
        raise GGUFError(f"block {block}: router {prefix}{_ROUTER}.weight not found")
    router_w = _to_f32(t_router)
    if router_w.shape != (E, D):
        raise GGUFError(f"{t_router.name}: expected [E, D] = {[E, D]}, got {list(router_w.shape)}")

    def vec(name: str, n: int) -> Any:
        t = get(name)
        if t is None:
            return None
        v = _to_f32(t).reshape(-1)
        if v.shape != (n,):
            raise GGUFError(f"{t.name}: expected {n} values, got shape {list(_shape(t))}")
        return jnp.asarray(v)

    shared: dict[str, Any] = {}
    if get(f"{_SHEXP['down']}.weight") is not None:
        sd = _host_experts(get(f"{_SHEXP['down']}.weight"), dense_dtype, leading_one=True)
        tsg, tsu = get(f"{_SHEXP['gate']}.weight"), get(f"{_SHEXP['up']}.weight")
        if tsg is None or tsu is None:
            raise GGUFError(f"block {block}: a shared expert needs {prefix}{_SHEXP['gate']}.weight and "
                             f"{prefix}{_SHEXP['up']}.weight")
        sg = _host_experts(tsg, dense_dtype, leading_one=True)
        su = _host_experts(tsu, dense_dtype, leading_one=True)
        Fs = sd.shape[2]
        for h in (sg, su):
            if h.shape != (1, Fs, D):
                raise GGUFError(f"{h.name}: expected [Fs, D] = {[Fs, D]}, got {list(h.shape[1:])}")
        if sd.shape[1] != D:
            raise GGUFError(f"{sd.name}: expected [D, Fs] with D = {D}, got {list(sd.shape[1:])}")
        sgu = _fuse(sg, su) if fuse else None
        if sgu is not None:
            shared["shared_gate_up"] = _device(sgu, owned=True)
        else:
            shared["shared_gate"] = _device(sg, owned=_owned(sg))
            shared["shared_up"] = _device(su, owned=_owned(su))
        shared["shared_down"] = _device(sd, owned=_owned(sd))
        shared["shared_expert_gate"] = vec(f"{_SHARED_GATE}.weight", D)

    return MoEWeights(
        router=jnp.asarray(np.ascontiguousarray(router_w.T)),
        down=_device(dn, owned=_owned(dn)),
        gate_up=None if gate_up is None else _device(gate_up, owned=_owned(gate_up)),
        gate=None if gate is None else _device(gate, owned=_owned(gate)),
        up=None if up is None else _device(up, owned=_owned(up)),
        router_bias=vec(f"{_ROUTER}.bias", E),
        selection_bias=vec(f"{_SELECTION_BIAS}.bias", E),
        config=cfg.router, activation=activation_fn, weight_layout="enk", **biases, **shared)


def load_blocks(
    source: str | os.PathLike | _gguf.GGUFReader,
    blocks: Iterable[int] | None = None,
    *,
    progress: bool | None = None,
    **kwargs: Any,
) -> dict[int, MoEWeights]:
    """Load many MoE blocks as ``{block: MoEWeights}``; the Flax modules build themselves from
    these (``jax_moe.nnx.load_blocks``, ``jax_moe.linen.load_blocks``).

    Args:
      blocks: block indices (default: every block with expert tensors).
      progress: show a tqdm progress bar (default: when loading more than one block).
      kwargs: passed to :func:`load_block_weights`.
    """
    reader = _reader(source)
    cfg = read_moe_config(reader, router=kwargs.pop("router", None),
                          activation=kwargs.pop("activation", None))
    blocks = list(cfg.moe_blocks if blocks is None else blocks)
    index = {t.name: t for t in reader.tensors}
    if progress is None:
        progress = len(blocks) > 1
    it: Iterable[int] = blocks
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is part of the gguf extra
            warnings.warn("jax_moe.gguf: install tqdm for a progress bar", stacklevel=2)
        else:
            it = tqdm(blocks, desc=f"loading {cfg.arch} MoE blocks", unit="block")
    return {b: load_block_weights(reader, b, _index=index, _config=cfg, **kwargs) for b in it}
