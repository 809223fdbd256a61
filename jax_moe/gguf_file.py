"""GGUF files as untrusted input: the reader behind :mod:`jax_moe.gguf`.

GGUF files are untrusted input. jax_moe reads a path itself (not with ``gguf.GGUFReader``): the
header is walked once in the memory-mapped file with every count, length and offset checked
against the file's size and every tensor's data placed by ggml's rule (each offset the aligned
running size: aligned, no overlap), so a truncated, corrupt or hostile file is a
:class:`GGUFError` (a ValueError) that says what is wrong instead of an exception from deep inside
a reader, a hang or an exhausted memory. Metadata values are decoded only when used and arrays
(tokenizer vocabularies) are stepped over, so the cost of a header is a pass over its bytes;
files of more than 65536 keys or tensors are refused. Big-endian files (gguf's
``gguf_convert_endian.py``) load with the weights they hold: their fp16 block scales and 16-bit
and wider numbers are byte-swapped as they are read. Every tensor's shape, type and data extent
is checked again on a ``gguf.GGUFReader`` passed in, and the MoE metadata and tensors are
checked against each other before any byte is copied.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import struct
import sys
from typing import Any, Iterable, Sequence

import numpy as np

from ._extras import require

_gguf = require("gguf", "gguf", "jax_moe.gguf")
_QT = _gguf.GGMLQuantizationType

__all__ = ["GGUFError"]


class GGUFError(ValueError):
    """A GGUF file that is truncated, corrupt or inconsistent with itself (its metadata, shapes,
    types or offsets); raised before any of its tensor bytes is used."""


# -- the file: walked once with every count, length and offset checked, read lazily ----------------

_MAX_DIMS = 4                 # GGML_MAX_DIMS: tensors of ggml have at most 4 dimensions
_MAX_ELEMENTS = 2**62         # elements of one tensor (byte counts stay far below 2**63)
_MAX_EXPERTS = 2**31 - 1      # expert ids are int32
_MAX_KEYS = 2**16             # metadata keys of one file (checkpoints have fewer than 100)
_MAX_TENSORS = 2**16          # tensors of one file (checkpoints have about a thousand)
_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_READER_VERSIONS = tuple(getattr(_gguf.gguf_reader, "READER_SUPPORTED_VERSIONS", (2, 3)))
_NATIVE = "<" if sys.byteorder == "little" else ">"
_TYPES = {int(q): q for q in _QT}  # ggml type id -> GGMLQuantizationType
# Tensor types stored as plain numbers (read as typed arrays, like gguf.GGUFReader does); every
# other type is read as bytes, [..., bytes per row].
_PLAIN = {int(_QT.F32): "f4", int(_QT.F16): "f2", int(_QT.F64): "f8", int(_QT.I8): "i1",
          int(_QT.I16): "i2", int(_QT.I32): "i4", int(_QT.I64): "i8"}
# Where a block holds 16-bit numbers (its fp16 scales), by block format: the bytes that differ
# between a little- and a big-endian file (what gguf's gguf_convert_endian.py swaps). ggml's
# decoders read every other byte of these blocks on its own or in byte lanes, so those are the
# same in both byte orders. BF16 is one 16-bit number per element.
_HALF_FIELDS: dict[int, tuple[int, ...]] = {
    int(_QT.BF16): (0,), int(_QT.Q4_0): (0,), int(_QT.Q4_1): (0, 2), int(_QT.Q8_0): (0,),
    int(_QT.Q2_K): (80, 82), int(_QT.Q3_K): (108,), int(_QT.Q4_K): (0, 2), int(_QT.Q5_K): (0, 2),
    int(_QT.Q6_K): (208,), 39: (),  # MXFP4: one E8M0 scale byte, then bytes of nibbles
}


def _tensor_nbytes(where: str, name: str, dims: Sequence[int], type_id: int) -> int:
    """Bytes of a tensor of ggml type ``type_id`` with GGUF dims ``dims`` (innermost first), or
    GGUFError naming what is wrong with it."""
    try:
        qt = _TYPES[type_id]
        block, type_size = _gguf.GGML_QUANT_SIZES[qt]
    except KeyError:
        raise GGUFError(f"{where}tensor {name!r} has unknown ggml type id {type_id}") from None
    if len(dims) > _MAX_DIMS:
        raise GGUFError(f"{where}tensor {name!r} has {len(dims)} dimensions; GGUF tensors have at most {_MAX_DIMS}")
    n = math.prod(dims)
    if n > _MAX_ELEMENTS:
        raise GGUFError(f"{where}tensor {name!r}: shape {list(reversed(dims))} holds {n} elements, more than "
                        f"any file can (the dimensions are corrupt)")
    row = dims[0] if dims else 1
    if row % block:
        raise GGUFError(f"{where}tensor {name!r}: its rows have {row} elements, not a multiple of the "
                        f"{qt.name} block size {block}")
    return n // block * type_size


def _check_placement(where: str, tensors: Iterable[tuple[str, int, int]], alignment: int,
                     data_start: int, size: int) -> None:
    """ggml's rule for tensor data (gguf.cpp): in file order, each tensor's offset is the aligned
    running size of the tensors before it, so the data of two tensors never overlap and every
    tensor starts aligned; and the data lie in the file. ``tensors``: (name, bytes, offset from
    the start of the data section)."""
    expected = 0
    for name, nbytes, offset in tensors:
        begin = data_start + offset
        if begin + nbytes > size:
            raise GGUFError(
                f"{where}tensor {name!r}: its data, bytes [{begin}, {begin + nbytes}), extends past "
                f"the end of the file ({size} bytes): the file is truncated or the offset is corrupt")
        if offset != expected:
            why = (f"not a multiple of the alignment {alignment}" if offset % alignment else
                   "inside the data of the tensors before it" if offset < expected else
                   "past the end of the tensor before it, leaving a gap")
            raise GGUFError(
                f"{where}tensor {name!r}: its data offset {offset} is {why}; GGUF tensors are "
                f"packed in file order, each at the aligned end of the one before (offset "
                f"{expected} here): the offsets are corrupt")
        expected = offset + -(-nbytes // alignment) * alignment


class _Field:
    """One metadata value of a :class:`_File`, decoded when asked for (``gguf.ReaderField``'s
    ``contents()``)."""

    __slots__ = ("file", "name", "vtype", "pos")

    def __init__(self, file: _File, name: str, vtype: int, pos: int):
        self.file, self.name, self.vtype, self.pos = file, name, vtype, pos

    def contents(self) -> Any:
        """The value: a bool, int, float or str, or a list of them for an array."""
        return self.file._decode(self.vtype, self.pos, self.name)


class _Tensor:
    """One tensor of a :class:`_File`: ``gguf.ReaderTensor``'s fields, its ``data`` read from the
    mapping when used (as gguf.GGUFReader shapes it: typed ``[..., K]`` for F32/F16/F64/I*,
    uint8 ``[..., bytes per row]`` otherwise), in the host's byte order whatever the file's."""

    __slots__ = ("file", "name", "tensor_type", "dims", "n_elements", "n_bytes", "data_offset")

    def __init__(self, file: _File, name: str, type_id: int, dims: tuple[int, ...], n_bytes: int,
                 data_offset: int):
        self.file, self.name, self.tensor_type, self.dims = file, name, _TYPES[type_id], dims
        self.n_elements, self.n_bytes, self.data_offset = math.prod(dims), n_bytes, data_offset

    @property
    def shape(self) -> np.ndarray:
        """GGUF dims, innermost first (uint64), as gguf.ReaderTensor has them."""
        return np.asarray(self.dims, np.uint64)

    @property
    def data(self) -> np.ndarray:
        return self.file._tensor_data(self)


class _File:
    """A GGUF file opened by jax_moe: the stand-in for gguf.GGUFReader (the same ``tensors``,
    ``get_field`` and tensor ``data``) that checks as it reads.

    The header is walked once in the memory-mapped file with every count, length and offset
    checked against the file's size, tensor placement checked against ggml's rule, and
    nothing materialized that the MoE blocks do not need: metadata values are decoded only
    when asked for, arrays (tokenizer vocabularies) are stepped over, and tensor data is read
    only when used. So a truncated, corrupt or hostile file is a :class:`GGUFError` in time
    proportional to its header, not a hang, an exhausted memory or an exception from deep
    inside gguf. A big-endian file (gguf_convert_endian.py) is read as the format defines: its
    fp16 block scales and 16-bit and wider numbers are byte-swapped as the data are read.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.where = f"{self.path}: "
        self.size = os.path.getsize(path)
        if self.size < 24:
            raise GGUFError(f"{self.where}{self.size} bytes is too short for a GGUF file (the header alone is 24 bytes)")
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        self.fields: dict[str, _Field] = {}
        self.tensors: list[_Tensor] = []
        self.order = "<"
        self.pos = 0
        self._scan(memoryview(self.data))

    # -- bounds-checked reads of the header ----------------------------------------------------
    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.where}truncated or corrupt GGUF file: {what} (at byte {self.pos} of {self.size})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes but only {self.size - self.pos} remain")

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.unpack("Q", f"the length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def skip_strings(self, count: int, what: str) -> None:
        """Step over ``count`` strings: one length read each, no object made."""
        need = count * 8
        self.need(need, f"{what} ({count} elements)")
        pos, size, buf = self.pos, self.size, self.buf
        length = struct.Struct(self.order + "Q").unpack_from
        try:
            for i in range(count):
                (n,) = length(buf, pos)
                pos += 8 + n
        except (struct.error, OverflowError):
            pos = size + 1
        if pos > size:
            raise self.fail(f"{what}: its strings run past the end of the file")
        self.pos = pos

    def skip(self, vtype: int, what: str, depth: int = 0) -> Any:
        """Step over one value of GGUFValueType ``vtype``; a scalar's value is returned."""
        if vtype in _SCALAR_FMT:
            return self.unpack(_SCALAR_FMT[vtype], what)
        if vtype == _STRING:
            n = self.unpack("Q", f"the length of {what}")
            self.need(n, what)
            self.pos += n
            return None
        if vtype == _ARRAY:
            if depth > 8:
                raise self.fail(f"{what}: arrays nested more than 8 deep")
            etype = self.unpack("I", f"the element type of {what}")
            count = self.unpack("Q", f"the length of {what}")
            if etype in _SCALAR_FMT:
                n = count * struct.calcsize(_SCALAR_FMT[etype])
                self.need(n, f"{what} ({count} elements)")
                self.pos += n
            elif etype == _STRING:
                self.skip_strings(count, what)
            elif etype == _ARRAY:
                self.need(count * 12, f"{what} ({count} elements)")
                for _ in range(count):
                    self.skip(etype, what, depth + 1)
            else:
                raise self.fail(f"{what} has unknown element type {etype}")
            return None
        raise self.fail(f"{what} has unknown value type {vtype}")

    def tensor_info(self, i: int) -> tuple[str, list[int], int, int]:
        """Tensor description ``i`` (name, dims, type id, offset), read with every bound checked."""
        name = self.string(f"the name of tensor {i}")
        n_dims = self.unpack("I", f"the rank of tensor {name!r}")
        if n_dims > _MAX_DIMS:
            raise self.fail(f"tensor {name!r} has {n_dims} dimensions; GGUF tensors have at most {_MAX_DIMS}")
        dims = [self.unpack("Q", f"the shape of tensor {name!r}") for _ in range(n_dims)]
        type_id = self.unpack("I", f"the type of tensor {name!r}")
        offset = self.unpack("Q", f"the data offset of tensor {name!r}")
        return name, dims, type_id, offset

    def _scan(self, buf: memoryview) -> None:
        self.buf = buf
        magic = self.unpack("I", "the magic")
        if magic != _gguf.GGUF_MAGIC:
            raise GGUFError(f"{self.where}not a GGUF file (the magic number is {magic:#010x}, not "
                            f"{_gguf.GGUF_MAGIC:#010x} 'GGUF')")
        version = self.unpack("I", "the version")
        if version & 0xFFFF == 0:  # written in the other byte order
            self.order = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in _READER_VERSIONS:
            raise GGUFError(f"{self.where}GGUF version {version} is not supported (versions {list(_READER_VERSIONS)})")
        n_tensors = self.unpack("Q", "the tensor count")
        n_kv = self.unpack("Q", "the key count")
        self.need(n_kv * 13, f"{n_kv} metadata keys")
        if n_kv > _MAX_KEYS:
            raise GGUFError(f"{self.where}{n_kv} metadata keys, more than the {_MAX_KEYS} jax_moe reads "
                            f"(checkpoints have fewer than 100)")
        alignment = _gguf.GGUF_DEFAULT_ALIGNMENT
        for i in range(n_kv):
            key = self.string(f"the name of metadata key {i}")
            if key in self.fields:
                raise self.fail(f"metadata key {key!r} occurs twice")
            vtype = self.unpack("I", f"the type of {key!r}")
            pos = self.pos
            v = self.skip(vtype, f"the value of {key!r}")
            self.fields[key] = _Field(self, key, vtype, pos)
            if key == "general.alignment":
                if vtype != _UINT32 or not v or v & (v - 1):
                    raise self.fail(f"general.alignment must be a uint32 power of two, got {v!r}")
                alignment = v
        self.need(n_tensors * 24, f"{n_tensors} tensor descriptions")
        if n_tensors > _MAX_TENSORS:
            raise GGUFError(f"{self.where}{n_tensors} tensors, more than the {_MAX_TENSORS} jax_moe reads "
                            f"(checkpoints have about a thousand)")
        infos = []
        names: set[str] = set()
        # The fast path reads a description in three unpacks; anything out of bounds is read
        # again by tensor_info, which says what is wrong.
        o = self.order
        length, rank = struct.Struct(o + "Q").unpack_from, struct.Struct(o + "I").unpack_from
        rest = [struct.Struct(o + "Q" * n + "IQ") for n in range(_MAX_DIMS + 1)]
        for i in range(n_tensors):
            pos = self.pos
            try:
                (n,) = length(buf, pos)
                if pos + 8 + n + 4 > self.size:
                    raise IndexError
                name = bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8")
                (n_dims,) = rank(buf, pos + 8 + n)
                *dims, type_id, offset = rest[n_dims].unpack_from(buf, pos + 12 + n)
                self.pos = pos + 12 + n + rest[n_dims].size
            except (IndexError, struct.error, UnicodeDecodeError, OverflowError):
                self.pos = pos
                name, dims, type_id, offset = self.tensor_info(i)
            if name in names:
                self.pos = pos
                raise self.fail(f"tensor {name!r} occurs twice")
            names.add(name)
            dims = tuple(dims)
            infos.append((name, dims, type_id, _tensor_nbytes(self.where, name, dims, type_id), offset))
        self.alignment = alignment
        self.data_offset = start = -(-self.pos // alignment) * alignment
        _check_placement(self.where, ((n, nb, off) for n, _, _, nb, off in infos), alignment, start, self.size)
        self.tensors = [_Tensor(self, n, t, dims, nb, start + off) for n, dims, t, nb, off in infos]
        del self.buf

    # -- values and tensor data, when used -------------------------------------------------------
    def get_field(self, key: str) -> _Field | None:
        return self.fields.get(key)

    def _decode(self, vtype: int, pos: int, name: str) -> Any:
        buf = memoryview(self.data)

        def value(vtype: int, pos: int) -> tuple[Any, int]:
            if vtype in _SCALAR_FMT:
                fmt = self.order + _SCALAR_FMT[vtype]
                return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
            if vtype == _STRING:
                (n,) = struct.unpack_from(self.order + "Q", buf, pos)
                try:
                    return bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8"), pos + 8 + n
                except UnicodeDecodeError:
                    raise GGUFError(f"{self.where}metadata {name!r} is not valid UTF-8") from None
            etype, count = struct.unpack_from(self.order + "IQ", buf, pos)
            pos += 12
            if etype in _SCALAR_FMT:  # the walk checked that the elements are in the file
                dt = np.dtype(_SCALAR_FMT[etype]).newbyteorder(self.order)
                return np.frombuffer(buf, dt, count, pos).tolist(), pos + count * dt.itemsize
            out = []
            for _ in range(count):
                v, pos = value(etype, pos)
                out.append(v)
            return out, pos

        return value(vtype, pos)[0]

    def _tensor_data(self, t: _Tensor) -> np.ndarray:
        qt = int(t.tensor_type)
        np_dims = tuple(reversed(t.dims))
        raw = self.data[t.data_offset:t.data_offset + t.n_bytes]
        plain = _PLAIN.get(qt)
        if plain is not None:
            arr = raw.view(np.dtype(plain).newbyteorder(self.order)).reshape(np_dims)
            return arr if self.order == _NATIVE else arr.astype(arr.dtype.newbyteorder("="))
        block, type_size = _gguf.GGML_QUANT_SIZES[t.tensor_type]
        arr = raw.reshape(np_dims[:-1] + (np_dims[-1] // block * type_size,) if np_dims else (t.n_bytes,))
        if self.order == _NATIVE:
            return arr
        halves = _HALF_FIELDS.get(qt)
        if halves is None:
            supported = ", ".join(_QT(q).name for q in (*_PLAIN, *_HALF_FIELDS) if q in _QT._value2member_map_)
            raise GGUFError(f"{self.where}tensor {t.name!r}: {t.tensor_type.name} data of a big-endian file "
                            f"cannot be byte-swapped (jax_moe reads big-endian {supported})")
        out = np.array(arr)
        blocks = out.reshape(-1, type_size)
        for at in halves:
            blocks[:, [at, at + 1]] = blocks[:, [at + 1, at]]
        return out


def _check_tensors(reader: _gguf.GGUFReader) -> None:
    """Every tensor of a gguf.GGUFReader passed in: shape, type and bytes agree with each other,
    lie in the file and are placed by ggml's rule; the file is in the host's byte order."""
    where = f"{getattr(getattr(reader, 'data', None), 'filename', None) or 'GGUF file'}: "
    if getattr(reader, "byte_order", "I") != "I":
        raise GGUFError(f"{where}the file's byte order is not the host's, and gguf.GGUFReader does not "
                        f"byte-swap the fp16 scales of GGUF blocks: pass the file's path instead (jax_moe "
                        f"byte-swaps the data of big-endian files it opens)")
    size = int(reader.data.size)
    placed = []
    for t in reader.tensors:
        dims = [int(d) for d in t.shape]
        nbytes = _tensor_nbytes(where, t.name, dims, int(t.tensor_type))
        data = t.data
        if (int(data.nbytes) != nbytes or int(t.n_elements) != math.prod(dims)
                or int(t.data_offset) + nbytes > size or int(t.data_offset) < 0):
            raise GGUFError(f"{where}tensor {t.name!r}: shape {list(reversed(dims))} of {_type_name(t)} needs "
                            f"{nbytes} bytes at offset {int(t.data_offset)}, but the file holds {int(data.nbytes)} "
                            f"there ({size} bytes in all): the file is truncated or corrupt")
        placed.append((t.name, nbytes, int(t.data_offset) - int(reader.data_offset)))
    _check_placement(where, placed, int(reader.alignment), int(reader.data_offset), size)


class _NotFound(FileNotFoundError, ValueError):
    """A GGUF path that does not exist (a FileNotFoundError, and a ValueError as before)."""


def _reader(source: str | os.PathLike | _gguf.GGUFReader) -> _File | _gguf.GGUFReader:
    if isinstance(source, (_File, _gguf.GGUFReader)):
        if isinstance(source, _gguf.GGUFReader):
            _check_tensors(source)
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path or a gguf.GGUFReader; got {type(source).__name__}")
    path = os.fspath(source)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise _NotFound(errno.ENOENT, "GGUF file not found", path) from None
    if not stat.S_ISREG(mode):
        what = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "not a regular file")
        raise ValueError(f"{path!r} is {what}, not a GGUF file: jax_moe memory-maps GGUF files, so it reads "
                         f"regular files only")
    return _File(path)


def _field(reader: _gguf.GGUFReader, key: str) -> Any:
    f = reader.get_field(key)
    if f is None:
        return None
    try:
        return f.contents()
    except GGUFError:
        raise
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise GGUFError(f"metadata {key!r} cannot be read ({type(e).__name__}: {e})") from None


def _int_field(reader: _gguf.GGUFReader, key: str, lo: int, hi: int | None = None) -> int | None:
    """Metadata ``key`` as an int in [lo, hi], None where absent; GGUFError naming the key otherwise."""
    v = _field(reader, key)
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
        want = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        raise GGUFError(f"metadata {key} must be {want}; the file has {v!r}")
    return int(v)


def _type_name(t: Any) -> str:
    try:
        return _QT(int(t.tensor_type)).name
    except ValueError:  # pragma: no cover
        return str(int(t.tensor_type))
