"""jax_moe.gguf's file reader: byte order, tensor placement, header size and what a path is.

Big-endian files come from gguf's own converter (gguf_convert_endian.py) and must load with the
weights of the little-endian file they came from; tensor data must be placed by ggml's rule
(each offset the aligned running size: no overlap, no misalignment); a header whose arrays or
tensor count are huge costs a pass over its bytes, not a Python object per element; a path that
is missing, a directory or a FIFO says so.
"""

from __future__ import annotations

import argparse
import builtins
import os
import shutil
import struct
import time
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
convert_endian = pytest.importorskip("gguf.scripts.gguf_convert_endian")

import jax_moe.gguf as jg  # noqa: E402
import jax_moe.gguf_file as gf  # noqa: E402
from jax_moe import QuantizedExperts  # noqa: E402
from test_gguf_loader import experts, qbytes, write as write_gguf  # noqa: E402
from test_hostile_gguf import (ARR, STR, U32, build, kv, load, meta, rejects, write,  # noqa: E402,F401
                               time_limit, valid_tensors)

QT = gguf.GGMLQuantizationType
BF16 = np.dtype(ml_dtypes.bfloat16)
D, F, E = 256, 256, 4
LEAVES = ("router", "gate_up", "gate", "up", "down", "router_bias", "selection_bias", "shared_gate_up",
          "shared_gate", "shared_up", "shared_down", "shared_expert_gate")

# Where each block format keeps its fp16 fields (ggml-common.h: block_q2_K {scales[16], qs[64],
# d, dmin}, block_q3_K {hmask[32], qs[64], scales[12], d}, block_q5_K {d, dmin, scales[12],
# qh[32], qs[128]}), for the formats gguf_convert_endian.py does not convert itself.
HALVES = {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q5_K: (0, 2)}


def swap_halves(offsets):
    def swap(tensor, block_offs):
        for at in offsets:
            tensor.data[block_offs + at:block_offs + at + 2].view(np.uint16).byteswap(inplace=True)
    return swap


def to_big_endian(src: str, dst: str, monkeypatch) -> str:
    """dst: src converted by gguf's gguf_convert_endian.py (in place on a copy, answering its
    YES prompt), with the three K-quants it lacks added to its table of block swaps."""
    shutil.copy(src, dst)
    with monkeypatch.context() as m:
        m.setattr(builtins, "input", lambda *a: "YES")
        for qt, offsets in HALVES.items():
            m.setitem(convert_endian.byteswap_tensors, qt, swap_halves(offsets))
        reader = gguf.GGUFReader(dst, "r+")
        convert_endian.convert_byteorder(reader, argparse.Namespace(order="big", dry_run=False))
        reader.data.flush()
        del reader
    return dst


def every_format_file(tmp_path, rng) -> str:
    """Three MoE blocks covering every format jax_moe runs, dense F16/BF16 and F32 vectors."""
    as_bf16 = lambda a: (a.astype(BF16).view(np.uint8), QT.BF16)  # noqa: E731
    t = {}
    for b, (g, u, d) in enumerate([("Q8_0", "Q4_K", "Q6_K"), ("Q2_K", "Q3_K", "Q5_K"), ("Q4_K", "Q4_K", "Q8_0")]):
        t[f"blk.{b}.ffn_gate_inp.weight"] = (rng.standard_normal((E, D)) / 4).astype(np.float32)
        t[f"blk.{b}.exp_probs_b.bias"] = (rng.standard_normal(E) / 10).astype(np.float32)
        t[f"blk.{b}.ffn_gate_exps.weight"] = qbytes(experts(rng, E, F, D), g)
        t[f"blk.{b}.ffn_up_exps.weight"] = qbytes(experts(rng, E, F, D), u)
        t[f"blk.{b}.ffn_down_exps.weight"] = qbytes(experts(rng, E, D, F), d)
    t["blk.0.ffn_gate_shexp.weight"] = as_bf16(experts(rng, 1, F, D)[0])
    t["blk.0.ffn_up_shexp.weight"] = as_bf16(experts(rng, 1, F, D)[0])
    t["blk.0.ffn_down_shexp.weight"] = experts(rng, 1, D, F)[0].astype(np.float16)
    t["blk.0.ffn_gate_inp_shexp.weight"] = (rng.standard_normal(D) / 16).astype(np.float32)
    meta = {"{arch}.block_count": 3, "{arch}.expert_count": E, "{arch}.expert_used_count": 2,
            "{arch}.embedding_length": D, "{arch}.expert_feed_forward_length": F,
            "{arch}.expert_shared_count": 1, "{arch}.expert_gating_func": 2,
            "{arch}.expert_weights_norm": True, "{arch}.expert_weights_scale": 2.5}
    return write_gguf(tmp_path / "le.gguf", "deepseek2", t, meta)


def leaves(w) -> dict:
    """Every array of a MoEWeights as numpy (quantized: the block bytes and the format)."""
    out = {}
    for name in LEAVES:
        leaf = getattr(w, name)
        if isinstance(leaf, QuantizedExperts):
            out[name] = (leaf.qtype, leaf.shape, np.asarray(leaf.data))
        elif leaf is not None:
            out[name] = (str(leaf.dtype), np.asarray(leaf).view(np.uint8))
    return out


def assert_same_weights(a, b) -> None:
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for name in la:
        for x, y in zip(la[name], lb[name]):
            if isinstance(x, np.ndarray):
                np.testing.assert_array_equal(x, y, err_msg=name)
            else:
                assert x == y, name


# -- byte order ------------------------------------------------------------------------------

def test_big_endian_file_loads_the_little_endian_weights(tmp_path, rng, monkeypatch):
    le = every_format_file(tmp_path, rng)
    be = to_big_endian(le, str(tmp_path / "be.gguf"), monkeypatch)
    assert gguf.GGUFReader(be).endianess == gguf.GGUFEndian.BIG
    assert open(le, "rb").read() != open(be, "rb").read()
    assert jg.read_moe_config(be) == jg.read_moe_config(le)
    w_le = jg.load_blocks(le, progress=False)
    w_be = jg.load_blocks(be, progress=False)
    assert sorted(w_be) == [0, 1, 2]
    for b in w_le:
        assert w_be[b].formats() == w_le[b].formats()
        assert_same_weights(w_be[b], w_le[b])
    # and what runs on them agrees
    x = jnp.asarray(rng.standard_normal((5, D)), jnp.bfloat16)
    run = jax.jit(lambda w, x: w(x))
    np.testing.assert_array_equal(np.asarray(run(w_be[1], x), np.float32), np.asarray(run(w_le[1], x), np.float32))


def test_big_endian_format_without_a_defined_swap_is_refused(tmp_path, rng, monkeypatch):
    """Q5_0 keeps its high bits as a 32-bit word: no byte order is defined for it, so a
    big-endian Q5_0 expert tensor is refused by name rather than decoded wrongly."""
    t = {"blk.0.ffn_gate_inp.weight": (rng.standard_normal((2, 32)) / 4).astype(np.float32),
         "blk.0.ffn_gate_exps.weight": experts(rng, 2, 32, 32).astype(np.float16),
         "blk.0.ffn_up_exps.weight": experts(rng, 2, 32, 32).astype(np.float16),
         "blk.0.ffn_down_exps.weight": (gguf.quants.quantize(experts(rng, 2, 32, 32), QT.Q8_0), QT.Q8_0)}
    le = write_gguf(tmp_path / "le.gguf", "qwen3moe", t, {"{arch}.expert_count": 2, "{arch}.expert_used_count": 1})
    data = bytearray(open(to_big_endian(le, str(tmp_path / "be.gguf"), monkeypatch), "rb").read())
    # retype the big-endian Q8_0 down tensor as Q5_0 (same 32-element blocks, 22 bytes each)
    name = b"blk.0.ffn_down_exps.weight"
    at = data.find(name) + len(name) + 4 + 3 * 8
    assert struct.unpack(">I", data[at:at + 4])[0] == int(QT.Q8_0)
    data[at:at + 4] = struct.pack(">I", int(QT.Q5_0))
    path = tmp_path / "q5_0.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(jg.GGUFError, match=r"ffn_down_exps\.weight.*Q5_0 data of a big-endian file cannot be byte-swapped"):
        jg.load_block_weights(str(path), 0)


def test_a_parsed_big_endian_reader_is_refused(tmp_path, rng, monkeypatch):
    be = to_big_endian(every_format_file(tmp_path, rng), str(tmp_path / "be.gguf"), monkeypatch)
    with pytest.raises(jg.GGUFError, match="byte order is not the host's.*pass the file's path"):
        jg.load_block_weights(gguf.GGUFReader(be), 0)


# -- tensor placement: ggml's rule -----------------------------------------------------------

def with_offsets(offsets) -> bytes:
    """The valid file with the header's data offsets replaced (the data section kept as is)."""
    good = build(meta(), valid_tensors())
    header = build(meta(), [dict(t, data=b"", offset=o) for t, o in zip(valid_tensors(), offsets)])
    return header + good[len(header):]


def packed_offsets(alignment: int = 32) -> list[int]:
    out, pos = [], 0
    for t in valid_tensors():
        pos = -(-pos // alignment) * alignment
        out.append(pos)
        pos += len(t["data"])
    return out


@pytest.mark.parametrize("offset,match", [
    (1, "1 is not a multiple of the alignment 32"),
    (0, "0 is inside the data of the tensors before it"),
    ("overlap", r"\d+ is inside the data of the tensors before it"),
    ("gap", r"\d+ is past the end of the tensor before it, leaving a gap"),
])
def test_offsets_must_be_the_aligned_running_size(write, offset, match):
    offsets = packed_offsets()
    assert with_offsets(offsets) == build(meta(), valid_tensors())
    offsets[2] = {"overlap": offsets[2] - 32, "gap": offsets[2] + 64}.get(offset, offset)
    path = write(with_offsets(offsets))
    rejects(path, rf"tensor 'blk\.0\.ffn_up_exps\.weight': its data offset {match}; GGUF tensors are packed")
    # the same rule for a parsed gguf.GGUFReader passed in
    with pytest.raises(jg.GGUFError, match=match):
        jg.load_block_weights(gguf.GGUFReader(path), 0)


def test_packed_offsets_with_a_larger_alignment_load(write):
    """general.alignment = 64: offsets that are the 64-aligned running size are accepted."""
    tensors, pos = [], 0
    for t in valid_tensors():
        pos = -(-pos // 64) * 64
        tensors.append(dict(t, offset=pos))
        pos += len(t["data"])
    kvs = meta() + [kv("general.alignment", U32, 64)]
    header = build(kvs, [dict(t, data=b"") for t in tensors], alignment=64)
    body = bytearray(pos)
    for t in tensors:
        body[t["offset"]:t["offset"] + len(t["data"])] = t["data"]
    w = load(write(header + bytes(body)))
    assert w.formats() == {"gate_up": "Q4_K", "down": "Q8_0"}
    np.testing.assert_array_equal(np.asarray(w.down.data).reshape(-1),
                                  np.frombuffer(tensors[-1]["data"], np.uint8))


# -- headers whose size is not what the block needs ---------------------------------------------

def strings_file(n: int) -> bytes:
    return build(meta() + [kv("tokenizer.ggml.tokens", ARR, struct.pack("<IQ", STR, n) + bytes(8 * n))],
                 valid_tensors())


def test_millions_of_metadata_strings_cost_a_pass_over_their_bytes(write):
    """4,000,000 empty strings in one array (32 MB): gguf.GGUFReader makes a Python object per
    element (about a minute and 6 GB); ours steps over them."""
    n = 4_000_000
    path = write(strings_file(n))
    t0 = time.perf_counter()
    with time_limit(30):
        cfg = jg.read_moe_config(path)
        w = jg.load_block_weights(path, 0)
    assert time.perf_counter() - t0 < 10
    assert cfg.expert_count == 2 and w.formats() == {"gate_up": "Q4_K", "down": "Q8_0"}
    # the array is still readable when asked for
    assert len(gf._reader(path).get_field("tokenizer.ggml.tokens").contents()) == n


def test_metadata_arrays_are_not_materialized(write):
    """Python memory while loading a block of a file with 400,000 strings in its metadata:
    none per string (gguf.GGUFReader: some 600 MB)."""
    path = write(strings_file(400_000))
    tracemalloc.start()
    try:
        w = jg.load_block_weights(path, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert w.formats() == {"gate_up": "Q4_K", "down": "Q8_0"}
    assert peak < 16 * 2**20, peak


def test_tensor_count_is_bounded(write):
    """More tensors than any checkpoint has is refused before any is described in memory; a
    file with many (tiny) tensors still loads in time proportional to its header."""
    tiny = [dict(name=f"t.{i}", dims=[1], type=0, data=bytes(4)) for i in range(20_000)]
    t0 = time.perf_counter()
    w = load(write(build(meta(), valid_tensors() + tiny)))
    assert time.perf_counter() - t0 < 10
    assert w.formats() == {"gate_up": "Q4_K", "down": "Q8_0"}
    n = gf._MAX_TENSORS + 1
    header = build(meta(), valid_tensors(), n_tensors=n)
    rejects(write(header + bytes(24 * n)), f"{n} tensors, more than the {gf._MAX_TENSORS} jax_moe reads")


def test_key_count_is_bounded(write):
    n = gf._MAX_KEYS + 1
    rejects(write(build(meta(), valid_tensors(), n_kv=n) + bytes(13 * n)),
            f"{n} metadata keys, more than the {gf._MAX_KEYS} jax_moe reads")


# -- what a path is --------------------------------------------------------------------------

def test_paths_that_are_not_gguf_files(tmp_path):
    missing = tmp_path / "missing.gguf"
    with pytest.raises(FileNotFoundError, match="GGUF file not found") as info:
        jg.read_moe_config(missing)
    assert isinstance(info.value, ValueError) and info.value.filename == str(missing)
    with pytest.raises(ValueError, match="is a directory, not a GGUF file"):
        jg.load_block_weights(tmp_path, 0)
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with time_limit(10), pytest.raises(ValueError, match=r"is a FIFO \(named pipe\), not a GGUF file"):
        jg.read_moe_config(fifo)
    with pytest.raises(TypeError, match="source must be a path"):
        jg.read_moe_config(3)


def test_a_block_whose_down_tensor_is_missing_says_so(write):
    """A block with gate/up experts but no down tensor (a corrupt name) is a GGUFError that
    names what is there, not 'no expert tensors; the MoE blocks are [0]'."""
    tensors = [dict(t, name=t["name"].replace("down_exps", "down_exqs")) for t in valid_tensors()]
    rejects(write(build(meta(), tensors)),
            r"block 0: blk\.0\.ffn_down_exps\.weight is missing, but the block has the expert tensors "
            r"\['blk\.0\.ffn_gate_exps\.weight', 'blk\.0\.ffn_up_exps\.weight'\]")
