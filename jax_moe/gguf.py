"""GGUF checkpoints: MoE metadata and expert tensors into ready MoE blocks.

::

    import jax_moe.gguf

    cfg = jax_moe.gguf.read_moe_config("Qwen3-30B-A3B-Q4_K_M.gguf")  # E, k, routing, MoE blocks
    moe = jax_moe.gguf.load_nnx("Qwen3-30B-A3B-Q4_K_M.gguf", block=0)  # a jax_moe.nnx.MoE
    blocks = jax_moe.gguf.load_blocks("Qwen3-30B-A3B-Q4_K_M.gguf")     # {block: MoE}, with a progress bar

The file is memory-mapped (``gguf.GGUFReader``). Expert tensors in a format jax_moe runs
(Q8_0, Q2_K..Q6_K; F16/BF16 dense) are used as stored, ``[E, N, K]`` in numpy order: their
bytes are copied once, from the mapped file into the array the module holds (gate and up
are written straight into one fused gate+up buffer when they share a format). Other formats
(IQ*, Q4_0, MXFP4, ...) are decoded with ``gguf.quants`` to bfloat16 with a warning naming the
tensor, or rejected with a ValueError when ``gguf`` cannot decode them either.

Tensors of block N: ``blk.N.ffn_gate_inp.weight`` (router ``[E, D]``, transposed to ``[D, E]``),
``blk.N.ffn_gate_inp.bias``, ``blk.N.exp_probs_b.bias`` (selection bias),
``blk.N.ffn_{gate,up,down}_exps.weight`` or ``blk.N.ffn_gate_up_exps.weight``, and the shared
expert ``blk.N.ffn_{gate,up,down}_shexp.weight`` with ``blk.N.ffn_gate_inp_shexp.weight``.

Metadata: ``{arch}.expert_count``, ``expert_used_count``, ``expert_weights_norm``,
``expert_weights_scale``, ``expert_gating_func``, ``expert_group_count``,
``expert_group_used_count``; where a file lacks a key, the architecture's llama.cpp default.

Requires the ``gguf`` package (and ``tqdm`` for progress bars), optional dependencies of jax_moe.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import Any, Iterable, Mapping

import gguf as _gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from . import quantized as _quantized
from .ffn import ACTIVATIONS, MoEWeights
from .kinds import QUANTIZED_TYPES, GGMLType
from .routing import RouterConfig

__all__ = [
    "GGUFMoEConfig",
    "load_block_weights",
    "load_blocks",
    "load_linen",
    "load_nnx",
    "read_moe_config",
]

_QT = _gguf.GGMLQuantizationType
_RUNS = {int(t) for t in QUANTIZED_TYPES}  # GGUF formats moe_matmul runs as they are
_DENSE = {int(_QT.F16): np.dtype(np.float16), int(_QT.BF16): np.dtype(ml_dtypes.bfloat16),
          int(_QT.F32): np.dtype(np.float32)}

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
_UNSUPPORTED_ARCH = {
    "gpt-oss": "gpt-oss experts use a clamped SwiGLU (alpha 1.702, limit 7) with per-expert "
               "biases, which jax_moe.ffn.moe_ffn does not implement",
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
      activation: the expert activation name.
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
    activation: str
    moe_blocks: tuple[int, ...]


def _reader(source: str | os.PathLike | _gguf.GGUFReader) -> _gguf.GGUFReader:
    if isinstance(source, _gguf.GGUFReader):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path or a gguf.GGUFReader; got {type(source).__name__}")
    if not os.path.isfile(source):
        raise ValueError(f"GGUF file not found: {os.fspath(source)!r}")
    return _gguf.GGUFReader(source, "r")


def _field(reader: _gguf.GGUFReader, key: str) -> Any:
    f = reader.get_field(key)
    return None if f is None else f.contents()


def read_moe_config(source: str | os.PathLike | _gguf.GGUFReader, *,
                    router: RouterConfig | None = None,
                    activation: str | None = None) -> GGUFMoEConfig:
    """Read the MoE hyperparameters of a GGUF file (path or ``gguf.GGUFReader``).

    ``router``/``activation`` override what the file says (or what its architecture implies).
    Raises ValueError for a file without experts or with inconsistent routing metadata.
    """
    reader = _reader(source)
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise ValueError("not a model GGUF file: general.architecture is missing")
    key = lambda name: f"{arch}.{name}"  # noqa: E731
    n_expert = _field(reader, key("expert_count"))
    if not n_expert:
        raise ValueError(f"{arch} checkpoint has no experts ({key('expert_count')} is missing or 0)")
    k = _field(reader, key("expert_used_count"))
    if not k:
        raise ValueError(f"{key('expert_used_count')} is missing or 0")
    moe_blocks = sorted({int(m.group(1)) for t in reader.tensors
                         if (m := _EXPERT_TENSOR.match(t.name))})

    if router is None:
        gating, norm = _ARCH_ROUTING.get(arch, (None, None))
        func = _field(reader, key("expert_gating_func"))
        if func is not None:
            if int(func) not in _GATING_FUNC:
                raise ValueError(f"{key('expert_gating_func')} = {func} is not a known gating "
                                 f"function (1 softmax, 2 sigmoid)")
            gating = _GATING_FUNC[int(func)]
        file_norm = _field(reader, key("expert_weights_norm"))
        if file_norm is not None:
            norm = bool(file_norm)
        if gating is None or norm is None:
            warnings.warn(f"jax_moe.gguf: no routing defaults known for architecture {arch!r}; using "
                          f"gating={gating or 'softmax'!r}, normalize={bool(norm)} (pass router= to "
                          f"override)", stacklevel=2)
            gating, norm = gating or "softmax", bool(norm)
        scale = _field(reader, key("expert_weights_scale"))
        scale = 1.0 if not scale else float(scale)
        groups = int(_field(reader, key("expert_group_count")) or 1)
        used = int(_field(reader, key("expert_group_used_count")) or groups)
        router = RouterConfig(k=int(k), gating=gating, normalize=norm, scale=scale,
                              n_groups=groups, n_groups_used=used)
    elif not isinstance(router, RouterConfig):
        raise TypeError(f"router must be a RouterConfig or None; got {type(router).__name__}")
    if activation is None:
        activation = "swiglu"
    elif activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}; got {activation!r}")

    def opt_int(name: str) -> int | None:
        v = _field(reader, key(name))
        return None if v is None else int(v)

    return GGUFMoEConfig(
        arch=arch, block_count=opt_int("block_count"), expert_count=int(n_expert),
        expert_used_count=int(k), embedding_length=opt_int("embedding_length"),
        expert_feed_forward_length=opt_int("expert_feed_forward_length"),
        expert_shared_count=opt_int("expert_shared_count") or 0, router=router,
        activation=activation, moe_blocks=tuple(moe_blocks))


# -- tensors -------------------------------------------------------------------------------------

def _shape(t: Any) -> tuple[int, ...]:
    """A tensor's logical shape in numpy order (GGUF stores it reversed)."""
    return tuple(int(s) for s in reversed([int(d) for d in t.shape]))


def _type_name(t: Any) -> str:
    try:
        return _QT(int(t.tensor_type)).name
    except ValueError:  # pragma: no cover
        return str(int(t.tensor_type))


@dataclasses.dataclass
class _Host:
    """An expert tensor on the host, before it is put on the device."""

    name: str
    shape: tuple[int, int, int]  # (E, N, K)
    qtype: GGMLType | None       # quantized format, or None for dense
    data: np.ndarray             # uint8 [E, N, bytes] (a view of the mapped file) or dense [E, N, K]


def _host_experts(t: Any, dense_dtype: np.dtype, *, leading_one: bool = False) -> _Host:
    shape = _shape(t)
    data = t.data
    if leading_one:  # a shared expert's 2-d tensor as one expert
        if len(shape) != 2:
            raise ValueError(f"{t.name}: expected a 2-d tensor, got shape {list(shape)}")
        shape, data = (1,) + shape, data.reshape((1,) + tuple(data.shape))
    if len(shape) != 3:
        raise ValueError(f"{t.name}: expected a 3-d expert tensor [E, N, K], got shape {list(shape)}")
    qt = int(t.tensor_type)
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
        raise ValueError(
            f"{t.name}: tensor type {_type_name(t)} is not a format jax_moe runs (Q8_0, Q2_K..Q6_K, "
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
    if qt in _DENSE or qt == int(_QT.F64):
        data = t.data.view(_DENSE[qt]) if qt == int(_QT.BF16) else t.data
        return np.asarray(data, np.float32).reshape(_shape(t))
    try:
        return _gguf.quants.dequantize(t.data, _QT(qt)).astype(np.float32).reshape(_shape(t))
    except NotImplementedError:
        raise ValueError(f"{t.name}: gguf cannot decode tensor type {_type_name(t)}") from None


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
      router, activation: override the file's routing / activation (see :func:`read_moe_config`).
      dense_dtype: dtype of dense (F16/BF16/F32) and decoded expert weights: bfloat16 or float16.
      fuse: write ``ffn_gate_exps`` and ``ffn_up_exps`` into one fused gate+up weight when they
        share a format (one moe_matmul call instead of two).

    Returns:
      A :class:`jax_moe.ffn.MoEWeights` in GGUF's ``[E, N, K]`` layout (``weight_layout="enk"``).
    """
    reader = _reader(source)
    arch = _field(reader, "general.architecture")
    if arch in _UNSUPPORTED_ARCH:
        raise ValueError(f"block {block}: {_UNSUPPORTED_ARCH[arch]}")
    cfg = _config or read_moe_config(reader, router=router, activation=activation)
    dense_dtype = np.dtype(dense_dtype)
    if dense_dtype not in (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)):
        raise TypeError(f"dense_dtype must be bfloat16 or float16; got {dense_dtype}")
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)):
        raise TypeError(f"block must be an int; got {block!r}")
    index = _index if _index is not None else {t.name: t for t in reader.tensors}
    prefix = f"blk.{int(block)}."
    get = lambda name: index.get(prefix + name)  # noqa: E731

    def experts(name: str) -> _Host | None:
        """``ffn_{name}_exps.weight``, or the legacy per-expert tensors stacked into one buffer."""
        t = get(f"ffn_{name}_exps.weight")
        if t is not None:
            return _host_experts(t, dense_dtype)
        if get(f"ffn_{name}.0.weight") is None:
            return None
        parts = []
        for e in range(cfg.expert_count):
            te = get(f"ffn_{name}.{e}.weight")
            if te is None:
                raise ValueError(f"{prefix}ffn_{name}.{e}.weight is missing ({cfg.expert_count} experts)")
            parts.append(_host_experts(te, dense_dtype, leading_one=True))
        first = parts[0]
        if any((h.shape, h.qtype, h.data.dtype) != (first.shape, first.qtype, first.data.dtype) for h in parts):
            raise ValueError(f"{prefix}ffn_{name}.*.weight: the experts differ in shape or format")
        buf = np.empty((len(parts),) + tuple(first.data.shape[1:]), first.data.dtype)
        for e, h in enumerate(parts):
            buf[e] = h.data[0]
        return _Host(f"{prefix}ffn_{name}.*.weight", (len(parts),) + first.shape[1:], first.qtype, buf)

    if get("ffn_down_exps.weight") is None and get("ffn_down.0.weight") is None:
        raise ValueError(f"block {block} has no expert tensors ({prefix}ffn_down_exps.weight not "
                         f"found); the MoE blocks of this file are {list(cfg.moe_blocks)}")
    unsupported = sorted(n for n in index if n.startswith(prefix) and
                         re.match(r"ffn_\w*(_exps|_shexp)\.(?!weight$)", n[len(prefix):]))
    if unsupported:
        raise ValueError(f"block {block}: expert tensors {unsupported} (biases or scales of experts) "
                         f"are not supported by jax_moe")

    dn = experts("down")
    E, D, F = dn.shape
    if E != cfg.expert_count:
        raise ValueError(f"{dn.name}: {E} experts, but the file says expert_count = {cfg.expert_count}")
    gate_up = gate = up = None
    if get("ffn_gate_up_exps.weight") is not None:
        gate_up = _host_experts(get("ffn_gate_up_exps.weight"), dense_dtype)
        if gate_up.shape != (E, 2 * F, D):
            raise ValueError(f"{gate_up.name}: expected [E, 2F, D] = {[E, 2 * F, D]}, got {list(gate_up.shape)}")
    else:
        gate, up = experts("gate"), experts("up")
        if gate is None or up is None:
            raise ValueError(f"block {block}: needs {prefix}ffn_gate_up_exps.weight or both "
                             f"{prefix}ffn_gate_exps.weight and {prefix}ffn_up_exps.weight")
        for h in (gate, up):
            if h.shape != (E, F, D):
                raise ValueError(f"{h.name}: expected [E, F, D] = {[E, F, D]}, got {list(h.shape)}")
        if fuse and (fused := _fuse(gate, up)) is not None:
            gate_up, gate, up = fused, None, None

    t_router = get("ffn_gate_inp.weight")
    if t_router is None:
        raise ValueError(f"block {block}: router {prefix}ffn_gate_inp.weight not found")
    router_w = _to_f32(t_router)
    if router_w.shape != (E, D):
        raise ValueError(f"{t_router.name}: expected [E, D] = {[E, D]}, got {list(router_w.shape)}")

    def vec(name: str, n: int) -> Any:
        t = get(name)
        if t is None:
            return None
        v = _to_f32(t).reshape(-1)
        if v.shape != (n,):
            raise ValueError(f"{t.name}: expected {n} values, got shape {list(_shape(t))}")
        return jnp.asarray(v)

    shared: dict[str, Any] = {}
    if get("ffn_down_shexp.weight") is not None:
        sd = _host_experts(get("ffn_down_shexp.weight"), dense_dtype, leading_one=True)
        tsg, tsu = get("ffn_gate_shexp.weight"), get("ffn_up_shexp.weight")
        if tsg is None or tsu is None:
            raise ValueError(f"block {block}: a shared expert needs {prefix}ffn_gate_shexp.weight and "
                             f"{prefix}ffn_up_shexp.weight")
        sg = _host_experts(tsg, dense_dtype, leading_one=True)
        su = _host_experts(tsu, dense_dtype, leading_one=True)
        Fs = sd.shape[2]
        for h in (sg, su):
            if h.shape != (1, Fs, D):
                raise ValueError(f"{h.name}: expected [Fs, D] = {[Fs, D]}, got {list(h.shape[1:])}")
        if sd.shape[1] != D:
            raise ValueError(f"{sd.name}: expected [D, Fs] with D = {D}, got {list(sd.shape[1:])}")
        sgu = _fuse(sg, su) if fuse else None
        if sgu is not None:
            shared["shared_gate_up"] = _device(sgu, owned=True)
        else:
            shared["shared_gate"] = _device(sg, owned=_owned(sg))
            shared["shared_up"] = _device(su, owned=_owned(su))
        shared["shared_down"] = _device(sd, owned=_owned(sd))
        shared["shared_expert_gate"] = vec("ffn_gate_inp_shexp.weight", D)

    return MoEWeights(
        router=jnp.asarray(np.ascontiguousarray(router_w.T)),
        down=_device(dn, owned=_owned(dn)),
        gate_up=None if gate_up is None else _device(gate_up, owned=_owned(gate_up)),
        gate=None if gate is None else _device(gate, owned=_owned(gate)),
        up=None if up is None else _device(up, owned=_owned(up)),
        router_bias=vec("ffn_gate_inp.bias", E),
        selection_bias=vec("exp_probs_b.bias", E),
        config=cfg.router, activation=cfg.activation, weight_layout="enk", **shared)


def load_nnx(source: str | os.PathLike | _gguf.GGUFReader, block: int, *, dtype: Any = jnp.bfloat16,
             **kwargs: Any):
    """Block ``block`` as a :class:`jax_moe.nnx.MoE` computing in ``dtype`` (bfloat16/float16,
    or float32 with quantized experts). ``kwargs`` go to :func:`load_block_weights`."""
    from .nnx import MoE

    return MoE.from_weights(load_block_weights(source, block, **kwargs), dtype=dtype)


def load_linen(source: str | os.PathLike | _gguf.GGUFReader, block: int, *, dtype: Any = jnp.bfloat16,
               **kwargs: Any):
    """Block ``block`` as ``(jax_moe.linen.MoE, variables)``; see :func:`load_nnx`."""
    from .linen import MoE

    return MoE.from_weights(load_block_weights(source, block, **kwargs), dtype=dtype)


def load_blocks(
    source: str | os.PathLike | _gguf.GGUFReader,
    blocks: Iterable[int] | None = None,
    *,
    framework: str = "nnx",
    dtype: Any = jnp.bfloat16,
    progress: bool | None = None,
    **kwargs: Any,
) -> dict[int, Any]:
    """Load many MoE blocks: ``{block: module}`` (``framework="nnx"``), ``{block: (module,
    variables)}`` (``"linen"``) or ``{block: MoEWeights}`` (``"weights"``).

    Args:
      blocks: block indices (default: every block with expert tensors).
      progress: show a tqdm progress bar (default: when loading more than one block).
      kwargs: passed to :func:`load_block_weights`.
    """
    if framework not in ("nnx", "linen", "weights"):
        raise ValueError(f'framework must be "nnx", "linen" or "weights"; got {framework!r}')
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
    out: dict[int, Any] = {}
    for b in it:
        w = load_block_weights(reader, b, _index=index, _config=cfg, **kwargs)
        if framework == "weights":
            out[b] = w
        elif framework == "nnx":
            from .nnx import MoE as NnxMoE

            out[b] = NnxMoE.from_weights(w, dtype=dtype)
        else:
            from .linen import MoE as LinenMoE

            out[b] = LinenMoE.from_weights(w, dtype=dtype)
    return out
