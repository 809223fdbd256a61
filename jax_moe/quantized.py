"""GGUF-quantized expert weights: the ``QuantizedExperts`` pytree and the host codecs."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from . import _ext
from .kinds import GGMLType, as_qtype, block_size, row_bytes


@jax.tree_util.register_pytree_node_class
class QuantizedExperts:
    """Expert weights ``[E, N, K]`` stored as GGUF blocks along K.

    Attributes:
      data: uint8 ``[E, N, K // QK * block_bytes]`` (numpy or jax array): the pytree's one leaf.
        Stacked layers add leading axes, ``[L, E, N, K // QK * block_bytes]`` (any number), as
        a scan-over-layers model holds them: ``jax.lax.scan``, ``nnx.scan`` and ``vmap`` slice
        the leaf and leave one layer's experts; ``q[i]`` takes layer ``i`` by hand.
      qtype: the GGUF format (static).
      shape: the logical shape ``(E, N, K)`` of one layer's experts (static). The constructor
        also takes the whole ``(L, ..., E, N, K)``.

    This is exactly the layout of GGUF's expert tensors (``ffn_gate_exps`` ``[E, F, D]``,
    ``ffn_down_exps`` ``[E, D, F]`` in numpy order), so file tensors are used as stored.
    """

    __slots__ = ("data", "qtype", "shape")

    def __init__(self, data: Any, qtype: GGMLType | int | str, shape: tuple[int, ...]):
        qtype = as_qtype(qtype)
        if not (hasattr(data, "shape") and hasattr(data, "dtype")):
            raise TypeError(f"data must be a uint8 array (numpy or jax) [E, N, K // QK * block_bytes]; "
                            f"got {type(data).__name__}")
        if not isinstance(shape, (tuple, list)) or not all(
                isinstance(s, (int, np.integer)) and not isinstance(s, (bool, np.bool_)) for s in shape):
            raise TypeError(f"shape must be a tuple of ints (E, N, K); got {shape!r}")
        shape = tuple(int(s) for s in shape)
        if len(shape) < 3 or any(s < 0 for s in shape):
            raise ValueError(f"shape must be (E, N, K), or (L, ..., E, N, K) for stacked layers, "
                             f"with non-negative sizes; got {shape}")
        lead = tuple(int(s) for s in data.shape[:-3])
        if len(shape) > 3 and shape[:-3] != lead:
            raise ValueError(f"shape {shape} names stacked layers {list(shape[:-3])} but data "
                             f"holds {lead}: data must be [..., E, N, Kb] with the same leading axes")
        shape = shape[-3:]
        E, N, K = shape
        qk = block_size(qtype)
        if K % qk != 0:
            raise ValueError(
                f"K = {K} must be a multiple of the {qtype.name} block size {qk} "
                f"(blocks run along K, the contracting dimension)"
            )
        expected = lead + (E, N, row_bytes(qtype, K))
        if len(data.shape) < 3 or tuple(data.shape) != expected:
            raise ValueError(
                f"data must be uint8 {list(expected)} for shape {shape} in {qtype.name} "
                f"(leading axes: stacked layers); got {np.dtype(data.dtype).name} {list(data.shape)}"
            )
        if np.dtype(data.dtype) != np.uint8:
            raise ValueError(f"data must be uint8; got {np.dtype(data.dtype).name}")
        self.data = data
        self.qtype = qtype
        self.shape = shape

    @property
    def E(self) -> int:
        """Number of experts."""
        return self.shape[0]

    @property
    def N(self) -> int:
        """Output rows per expert."""
        return self.shape[1]

    @property
    def K(self) -> int:
        """Contracting dimension."""
        return self.shape[2]

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """The leading axes of ``data`` (stacked layers); ``()`` for one layer's experts."""
        return tuple(int(s) for s in self.data.shape[:-3])

    def __getitem__(self, index: Any) -> QuantizedExperts:
        """Index the stacked-layer axes: ``q[i]`` is layer ``i``'s experts (data ``[E, N, Kb]``)."""
        if not self.stack_shape:
            raise IndexError(f"{self} holds one layer's experts: there is no layer axis to index")
        data = self.data[index]
        if data.ndim < 3:
            raise IndexError(f"index {index!r} reaches past the layer axes {list(self.stack_shape)} "
                             f"of {self}")
        return QuantizedExperts(data, self.qtype, self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized data."""
        return int(np.prod(self.data.shape))

    def tree_flatten(self):
        return (self.data,), (self.qtype, self.shape)

    @classmethod
    def tree_unflatten(cls, aux, children):
        # No validation here: transformations rebuild the node with tracers, batched arrays or
        # placeholders whose shapes differ from the logical one.
        obj = object.__new__(cls)
        obj.data, = children
        obj.qtype, obj.shape = aux
        return obj

    def __repr__(self) -> str:
        stack = f", stacked={list(self.stack_shape)}" if self.stack_shape else ""
        return f"QuantizedExperts(qtype={self.qtype.name}, shape={self.shape}{stack})"


def experts_enk(array: Any, weight_layout: str, name: str, qtype: GGMLType) -> np.ndarray:
    """A module's expert parameter as float32 ``[..., E, N, K]`` ready for ``quantize``.

    ``array`` is ``[..., E, N, K]`` (``weight_layout="enk"``) or ``[..., E, K, N]`` (``"ekn"``);
    a shared expert's (``name`` starts with ``"shared"``) has no E axis and gets one of size 1.
    Leading axes are stacked layers (``nnx.vmap`` / ``nn.scan`` modules) and stay. Raises
    ValueError naming ``name`` when K is not a multiple of ``qtype``'s block size.
    """
    a = np.asarray(np.asarray(array).astype(np.float32))
    if name.startswith("shared"):
        a = np.expand_dims(a, -3)
    if weight_layout == "ekn":
        a = np.swapaxes(a, -1, -2)
    if a.shape[-1] % block_size(qtype):
        raise ValueError(
            f"MoE.quantize: cannot store {name!r} as {qtype.name}: its contracting dimension "
            f"K = {a.shape[-1]} is not a multiple of the {qtype.name} block size {block_size(qtype)}")
    return a


def quantized_spec(spec: Any, ndim: int, weight_layout: str, *, shared: bool = False) -> tuple:
    """Where a dense expert kernel's dimensions go when it is quantized.

    ``spec`` names, per dimension of the dense kernel (rank ``ndim``: ``[..., E, N, K]`` /
    ``[..., E, K, N]``, or the shared expert's ``[..., N, K]`` / ``[..., K, N]``), its mesh axis
    or logical axis name (a PartitionSpec, or Flax's ``out_sharding`` / ``nn.Partitioned``
    names; missing trailing entries are None). Returns the same for the quantized block data
    ``[..., E, N, Kb]`` (shared: ``[..., 1, N, Kb]``): E and N keep theirs, K's is dropped
    (GGUF blocks run along K and are never split) and the shared expert's new E axis is None.
    """
    spec = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
    tail = 2 if shared else 3
    lead, dims = spec[:ndim - tail], spec[ndim - tail:]
    e = None if shared else dims[0]
    n = dims[-2] if weight_layout == "enk" else dims[-1]
    return (*lead, e, n, None)


def quantized_sharding(value: Any, weight_layout: str, *, shared: bool = False) -> Any:
    """The sharding for the quantized blocks of the dense kernel ``value``: its NamedSharding
    moved by :func:`quantized_spec` (same mesh), its single device, or None (default placement)."""
    sharding = getattr(value, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = quantized_spec(sharding.spec, value.ndim, weight_layout, shared=shared)
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    return None


def quantize(array: Any, qtype: GGMLType | int | str) -> QuantizedExperts:
    """Quantize expert weights ``[E, N, K]`` (any float dtype, numpy or jax) on the host;
    ``[L, ..., E, N, K]`` gives stacked layers (``QuantizedExperts`` with leading axes).

    Multi-threaded C++; Q8_0 is bit-exact with ``gguf.quants.quantize`` and the K-quants match
    the error of ggml's reference quantizers. Returns a ``QuantizedExperts`` whose data is a
    numpy array (move it with ``jax.device_put`` as any other leaf).

    Raises ValueError naming the first element the format cannot encode: NaN or infinite, or
    a magnitude its fp16 scales cannot reach (Q8_0: ``|x| >= 65520 * 127`` in a block, where
    ggml's scale overflows; the K-quants: ``|x| > 65504``).
    """
    qtype = as_qtype(qtype)
    a = np.asarray(array)
    if a.ndim < 3:
        raise ValueError(f"array must be [E, N, K] (or [L, ..., E, N, K]); got shape {list(a.shape)}")
    if not np.issubdtype(a.dtype, np.floating) and a.dtype.name != "bfloat16":
        raise TypeError(f"array must be a float array; got {a.dtype.name}")
    qk = block_size(qtype)
    if a.shape[-1] % qk != 0:
        raise ValueError(
            f"K = {a.shape[-1]} (the last dimension of array) must be a multiple of the "
            f"{qtype.name} block size {qk}"
        )
    with np.errstate(over="ignore"):  # values beyond float32 are named by the check
        x = np.ascontiguousarray(a, dtype=np.float32)
    _check_quantizable(a, x, qtype)
    data = _ext.cpu.quantize(x, int(qtype))
    return QuantizedExperts(data, qtype, a.shape)


def _q8_0_scale_overflows(amax: np.ndarray) -> np.ndarray:
    """Whether Q8_0's block scale ``d = max|x| / 127`` (float32, stored as float16, as ggml and
    gguf.quants compute it) is infinite for block maxima ``amax``."""
    with np.errstate(over="ignore"):
        return np.isinf((np.asarray(amax, np.float32) / np.float32(127)).astype(np.float16))


# Largest |x| each format stores without its fp16 scales saturating, as (test, bound for the
# message). Q8_0: exactly where ggml's (and gguf.quants') block scale overflows float16, so
# that Q8_0 stays bit-exact with gguf.quants for every input accepted. K-quants: the float16
# range, within which their fitted scales (at most the range of a sub-block) stay far below
# the largest fp16 super-block scale. Other formats: any finite value.
_MAGNITUDE: dict[GGMLType, tuple[Any, str]] = {
    GGMLType.Q8_0: (_q8_0_scale_overflows, "below 65520 * 127 = 8321040"),
    **{t: ((lambda amax: np.asarray(amax) > 65504.0), "at most 65504, the float16 range")
       for t in (GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)},
}
_CHECK_CHUNK = 1 << 22  # elements scanned at a time (no temporary larger than this)


def _check_quantizable(a: np.ndarray, x: np.ndarray, qtype: GGMLType) -> None:
    """ValueError naming the first element of ``a`` (as float32: ``x``) that ``qtype`` cannot
    encode: NaN or infinite anywhere, or a magnitude beyond the format's fp16 scales."""
    too_large, bound = _MAGNITUDE.get(qtype, (lambda amax: np.zeros(np.shape(amax), bool), ""))
    flat = x.reshape(-1)
    for i0 in range(0, flat.size, _CHECK_CHUNK):
        c = flat[i0:i0 + _CHECK_CHUNK]
        hi, lo = c.max(), c.min()  # NaN propagates into both
        if np.isfinite(hi) and np.isfinite(lo) and not too_large(max(hi, -lo)):
            continue
        bad = ~np.isfinite(c) | too_large(np.abs(c))
        where = np.unravel_index(i0 + int(np.argmax(bad)), x.shape)
        pos = "array[" + ", ".join(str(int(w)) for w in where) + "]"
        v, v32 = a[where], x[where]
        if not np.isfinite(v32) and not np.isfinite(v):
            raise ValueError(f"{pos} is {float(v)}: quantize takes finite values only (GGUF blocks have "
                             f"no encoding for NaN or infinity)")
        raise ValueError(f"{pos} = {float(v):.6g} is too large for {qtype.name}: its fp16 block scales "
                         f"would overflow (|x| must be {bound})")


def dequantize(q: QuantizedExperts) -> np.ndarray:
    """Decode ``QuantizedExperts`` to float32 ``[E, N, K]`` (stacked: ``[L, ..., E, N, K]``) on
    the host (bit-exact with ggml)."""
    if not isinstance(q, QuantizedExperts):
        raise TypeError(f"q must be a QuantizedExperts; got {type(q).__name__}")
    data = np.ascontiguousarray(np.asarray(q.data), dtype=np.uint8)
    return _ext.cpu.dequantize(data, int(q.qtype)).reshape(q.stack_shape + q.shape)
