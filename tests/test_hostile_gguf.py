"""GGUF files as untrusted input (jax_moe.gguf).

Files are written byte by byte here (not with gguf.GGUFWriter) so that every field can be made
wrong: truncated files, offsets and sizes past the end, shapes whose element count overflows,
rows that are not block multiples, unknown and wrong tensor types, metadata of the wrong type
or disagreeing with the tensors, and headers whose counts would make gguf.GGUFReader loop for
ever. Each is a GGUFError (a ValueError) that says what is wrong, raised before any tensor byte
is copied. A seeded, time-bounded fuzz test mutates a valid small file (bit flips, overwritten
words, truncation, appended bytes, edited tensor offsets, dims and types) and shows that
loading it either fails with a ValueError or returns exactly the weights the file holds, read
by gguf.GGUFReader, and that those run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import struct
import time
import warnings

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import jax_moe  # noqa: E402
import jax_moe.gguf as jg  # noqa: E402
from jax_moe import QuantizedExperts, moe_matmul  # noqa: E402
from jax_moe.kinds import row_bytes  # noqa: E402

QT = gguf.GGMLQuantizationType
E, D, F = 2, 256, 32
MAGIC = struct.pack("<I", gguf.GGUF_MAGIC)
# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
SCALE = float(os.environ.get("JAX_MOE_HYPOTHESIS_SCALE", "1"))


# -- a byte-level GGUF writer ----------------------------------------------------------------

def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key: str | bytes, vtype: int, value) -> bytes:
    """One metadata entry; `value` is a Python value (scalars, str) or raw payload bytes."""
    fmt = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q",
           I64: "q", F64: "d"}
    if isinstance(value, bytes):
        payload = value
    elif vtype == STR:
        payload = gstr(value)
    else:
        payload = struct.pack("<" + fmt[vtype], value)
    return gstr(key) + struct.pack("<I", vtype) + payload


def tensor_info(name: str | bytes, dims, type_id: int, offset: int) -> bytes:
    return gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<I", type_id) + struct.pack("<Q", offset)


def build(kvs: list[bytes], tensors: list[dict], *, version: int = 3, alignment: int = 32,
          n_kv: int | None = None, n_tensors: int | None = None, magic: bytes = MAGIC) -> bytes:
    """A GGUF file. tensors: dicts with name, dims (GGUF order: innermost first), type, data
    (bytes) and optionally offset (else packed, aligned)."""
    offsets, pos = [], 0
    for t in tensors:
        off = t.get("offset")
        if off is None:
            off = -(-pos // alignment) * alignment
            pos = off + len(t["data"])
        offsets.append(off)
    header = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    header += b"".join(kvs)
    header += b"".join(tensor_info(t["name"], t["dims"], t["type"], off) for t, off in zip(tensors, offsets))
    start = -(-len(header) // alignment) * alignment
    body = bytearray(max([0] + [o + len(t["data"]) for t, o in zip(tensors, offsets) if t.get("offset") is None]))
    for t, off in zip(tensors, offsets):
        if t.get("offset") is None:
            body[off:off + len(t["data"])] = t["data"]
    return header + b"\0" * (start - len(header)) + bytes(body)


def meta(**over) -> list[bytes]:
    items = {"general.architecture": (STR, "qwen3moe"), "qwen3moe.block_count": (U32, 1),
             "qwen3moe.expert_count": (U32, E), "qwen3moe.expert_used_count": (U32, 1),
             "qwen3moe.embedding_length": (U32, D), "qwen3moe.expert_feed_forward_length": (U32, F)}
    for key, v in over.items():
        key = key.replace("__", ".")
        if v is None:
            items.pop(key, None)
        else:
            items[key] = v
    return [kv(k, t, v) for k, (t, v) in items.items()]


def valid_tensors(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    q = lambda shape, fmt: np.asarray(jax_moe.quantize(  # noqa: E731
        (rng.standard_normal(shape) / 16).astype(np.float32), fmt).data).tobytes()
    router = (rng.standard_normal((E, D)) / 4).astype(np.float32).tobytes()
    return [
        dict(name="blk.0.ffn_gate_inp.weight", dims=[D, E], type=int(QT.F32), data=router),
        dict(name="blk.0.ffn_gate_exps.weight", dims=[D, F, E], type=int(QT.Q4_K), data=q((E, F, D), "Q4_K")),
        dict(name="blk.0.ffn_up_exps.weight", dims=[D, F, E], type=int(QT.Q4_K), data=q((E, F, D), "Q4_K")),
        dict(name="blk.0.ffn_down_exps.weight", dims=[F, D, E], type=int(QT.Q8_0), data=q((E, D, F), "Q8_0")),
    ]


def with_tensor(tensors: list[dict], name: str, **change) -> list[dict]:
    out = [dict(t) for t in tensors]
    for t in out:
        if t["name"] == f"blk.0.{name}.weight":
            t.update(change)
    return out


@functools.lru_cache(maxsize=1)
def base_bytes() -> bytes:
    return build(meta(), valid_tensors())


@pytest.fixture
def base() -> bytes:
    return base_bytes()


@pytest.fixture
def write(tmp_path):
    count = iter(range(10**6))

    def _write(data: bytes) -> str:
        path = tmp_path / f"f{next(count)}.gguf"
        path.write_bytes(data)
        return str(path)
    return _write


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (TimeoutError) instead of hanging: the alarm interrupts Python-level loops."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def load(path):
    with time_limit(30), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return jg.load_block_weights(path, 0)


def rejects(path, match: str):
    t0 = time.perf_counter()
    with pytest.raises(jg.GGUFError, match=match):
        load(path)
    assert time.perf_counter() - t0 < 10


EXPERTS = ("gate_up", "gate", "up", "down")


def check_buffers(w) -> None:
    """Every expert buffer holds exactly the bytes its logical shape implies, and runs."""
    for name in EXPERTS:
        leaf = getattr(w, name)
        if leaf is None:
            continue
        if isinstance(leaf, QuantizedExperts):
            En, N, K = leaf.shape
            assert tuple(leaf.data.shape) == (En, N, row_bytes(leaf.qtype, K)) and leaf.data.dtype == jnp.uint8
            assert leaf.nbytes == En * N * row_bytes(leaf.qtype, K)
            K_x = K
        else:
            En, N, K_x = leaf.shape
            assert leaf.dtype in (jnp.bfloat16, jnp.float16)
        x = jnp.ones((3, K_x), jnp.bfloat16)
        ids = jnp.asarray([[0], [En - 1], [En]], jnp.int32)
        out = moe_matmul(x, ids, leaf, jnp.ones((3, 1), jnp.float32))
        assert out.shape == (3, leaf.shape[1])
        assert np.all(np.asarray(out[2], np.float32) == 0)


# -- the valid file loads --------------------------------------------------------------------

def test_the_handwritten_file_is_valid(base, write):
    path = write(base)
    cfg = jg.read_moe_config(path)
    assert (cfg.expert_count, cfg.expert_used_count, cfg.moe_blocks) == (E, 1, (0,))
    w = load(path)
    assert w.formats() == {"gate_up": "Q4_K", "down": "Q8_0"}
    check_buffers(w)
    r = gguf.GGUFReader(path)  # the reference reader agrees with the writer
    assert [t.name for t in r.tensors] == [t["name"] for t in valid_tensors()]


# -- truncated files -------------------------------------------------------------------------

def data_start(kvs=None) -> int:
    """Where the data section of build(meta(), valid_tensors()) begins."""
    return len(build(meta() if kvs is None else kvs, [dict(t, data=b"") for t in valid_tensors()]))


def test_every_truncation_is_rejected(base, write):
    tensors = valid_tensors()
    end = data_start() + sum(-(-len(t["data"]) // 32) * 32 for t in tensors[:-1]) + len(tensors[-1]["data"])
    assert end == len(base)
    cuts = sorted(set(list(range(0, 600, 7)) + [23, 24, 25, end // 2, end - 4096, end - 35, end - 1]))
    for n in cuts:
        path = write(base[:n])
        with pytest.raises(jg.GGUFError, match="too short|truncated|past the end") as info:
            load(path)
        assert os.path.basename(path) in str(info.value)
    with pytest.raises(jg.GGUFError, match="too short"):
        jg.read_moe_config(write(b""))


# -- offsets and sizes past the end, overflowing shapes ---------------------------------------

@pytest.mark.parametrize("offset", [2**63, 2**64 - 1, 2**40, "at_eof", "straddles"])
def test_tensor_offset_past_the_end(base, write, offset):
    size = len(base)
    if offset == "at_eof":
        offset = size - data_start()
    elif offset == "straddles":
        offset = size - data_start() - 100
    bad = valid_tensors()
    bad[-1] = dict(bad[-1], offset=offset)  # the header says `offset`; the file keeps its length
    data = build(meta(), bad)
    data = data + b"\0" * max(0, size - len(data))
    rejects(write(data), r"ffn_down_exps\.weight.*extends past the end of the file")


@pytest.mark.parametrize("dims,match", [
    ([32, 256, 2**40], "extends past the end"),                 # plausible count, data missing
    ([32, 2**32, 2**32], "more than any file can"),             # 2**69 elements
    ([32, 2**31, 2**31, 2**2], "more than any file can"),       # wraps to 0 in uint64 (numpy)
    ([2**63, 2**1, 1], "more than any file can"),               # wraps to 0
    ([32, 2**58 + 1, 2**6], "more than any file can"),          # wraps to a small number
    ([32, 256, 2, 1, 1], "at most 4"),                          # 5 dimensions
])
def test_shapes_past_the_end_or_overflowing(write, dims, match):
    bad = with_tensor(valid_tensors(), "ffn_down_exps", dims=dims)
    rejects(write(build(meta(), bad)), match)


def test_rank_beyond_the_file(write):
    bad = with_tensor(valid_tensors(), "ffn_down_exps", dims=[32] * 3)
    data = bytearray(build(meta(), bad))
    # n_dims = 2**32 - 1: the reader would slice past the end; we name the tensor instead.
    pos = data.find(gstr("blk.0.ffn_down_exps.weight")) + len(gstr("blk.0.ffn_down_exps.weight"))
    data[pos:pos + 4] = struct.pack("<I", 2**32 - 1)
    rejects(write(bytes(data)), r"ffn_down_exps\.weight.*dimensions")


# -- rows that are not block multiples, wrong and unknown types -------------------------------

@pytest.mark.parametrize("name,dims,type_,match", [
    ("ffn_gate_exps", [300, F, E], QT.Q4_K, "rows have 300 elements, not a multiple of the Q4_K block size 256"),
    ("ffn_down_exps", [48, D, E], QT.Q8_0, "rows have 48 elements, not a multiple of the Q8_0 block size 32"),
    ("ffn_down_exps", [], QT.Q8_0, "rows have 1 elements"),
])
def test_rows_that_are_not_block_multiples(write, name, dims, type_, match):
    bad = with_tensor(valid_tensors(), name, dims=dims, type=int(type_))
    rejects(write(build(meta(), bad)), match)


@pytest.mark.parametrize("name,type_,match", [
    ("ffn_down_exps", 99, "unknown ggml type id 99"),
    ("ffn_down_exps", 2**32 - 1, "unknown ggml type id"),
    ("ffn_gate_exps", int(QT.I32), r"ffn_gate_exps\.weight: tensor type I32 is an integer type"),
    ("ffn_gate_inp", int(QT.I8), r"ffn_gate_inp\.weight: tensor type I8 is an integer type"),
    ("ffn_down_exps", int(QT.F64), r"ffn_down_exps\.weight: tensor type F64 is not a format jax_moe runs"),
])
def test_wrong_tensor_types(write, name, type_, match):
    tensors = valid_tensors()
    t = next(t for t in tensors if t["name"] == f"blk.0.{name}.weight")
    # keep the byte count consistent with the new type where the type is known, so that the
    # error is about the type and not about the size
    change = {"type": type_}
    if type_ in (int(QT.I32), int(QT.I8), int(QT.F64)):
        n_el = int(np.prod(t["dims"]))
        change["data"] = bytes(n_el * gguf.GGML_QUANT_SIZES[QT(type_)][1])
    rejects(write(build(meta(), with_tensor(tensors, name, **change))), match)


def test_expert_tensor_of_the_wrong_rank(write):
    bad = with_tensor(valid_tensors(), "ffn_down_exps", dims=[F, D * E])
    rejects(write(build(meta(), bad)), r"ffn_down_exps\.weight: expected a 3-d expert tensor")


# -- metadata that disagrees with the tensors or has the wrong type ---------------------------

@pytest.mark.parametrize("over,match", [
    (dict(qwen3moe__expert_count=(U32, 3)), "2 experts, but the file says expert_count = 3"),
    (dict(qwen3moe__expert_count=(U32, 0)), "has no experts"),
    (dict(qwen3moe__expert_count=(I32, -2)), r"expert_count must be an integer in \[0, 2147483647\]; the file has -2"),
    (dict(qwen3moe__expert_count=(U64, 2**40)), r"expert_count must be an integer in"),
    (dict(qwen3moe__expert_count=(STR, "2")), r"expert_count must be an integer.*'2'"),
    (dict(qwen3moe__expert_count=(F32, 2.0)), r"expert_count must be an integer.*2\.0"),
    (dict(qwen3moe__expert_count=(BOOL, True)), r"expert_count must be an integer.*True"),
    (dict(qwen3moe__expert_count=(ARR, struct.pack("<IQ", U32, 1) + struct.pack("<I", 2))), "expert_count must be an integer"),
    (dict(qwen3moe__expert_used_count=(U32, 3)), r"expert_used_count must be an integer in \[0, 2\]; the file has 3"),
    (dict(qwen3moe__expert_used_count=None), "expert_used_count is missing"),
    (dict(qwen3moe__embedding_length=(U32, 512)), "D = 256, but the file says embedding_length = 512"),
    (dict(qwen3moe__expert_feed_forward_length=(U32, 64)), "F = 32, but the file says expert_feed_forward_length = 64"),
    (dict(qwen3moe__block_count=(STR, "x")), "block_count must be an integer"),
    (dict(qwen3moe__expert_weights_scale=(F32, float("nan"))), "expert_weights_scale must be a finite number"),
    (dict(qwen3moe__expert_weights_scale=(F32, float("inf"))), "expert_weights_scale must be a finite number"),
    (dict(qwen3moe__expert_group_count=(U32, 3)), r"expert_group_count must be an integer in \[0, 2\]"),
    (dict(qwen3moe__expert_gating_func=(U32, 9)), "not a known gating function"),
    (dict(qwen3moe__expert_weights_norm=(STR, "yes")), "expert_weights_norm must be a bool"),
    (dict(general__architecture=(U32, 7)), "general.architecture is missing"),
])
def test_metadata_that_is_wrong(write, over, match):
    rejects(write(build(meta(**over), valid_tensors())), match)


@pytest.mark.parametrize("name,dims,match", [
    ("ffn_gate_exps", [D, F, 3], r"ffn_gate_exps\.weight: expected \[E, F, D\] = \[2, 32, 256\], got \[3, 32, 256\]"),
    ("ffn_gate_inp", [D, 3], r"ffn_gate_inp\.weight: expected \[E, D\] = \[2, 256\], got \[3, 256\]"),
])
def test_tensors_that_disagree_with_each_other(write, name, dims, match):
    tensors = valid_tensors()
    t = next(t for t in tensors if t["name"] == f"blk.0.{name}.weight")
    nbytes = int(np.prod(dims)) // gguf.GGML_QUANT_SIZES[QT(t["type"])][0] * gguf.GGML_QUANT_SIZES[QT(t["type"])][1]
    rejects(write(build(meta(), with_tensor(tensors, name, dims=dims, data=bytes(nbytes)))), match)


# -- headers that would hang or exhaust gguf.GGUFReader ---------------------------------------

@pytest.mark.parametrize("case,match", [
    ("magic", "not a GGUF file"),
    ("version1", "version 1 is not supported"),
    ("version99", "version 99 is not supported"),
    ("n_kv", "metadata keys needs"),
    ("n_tensors", "tensor descriptions needs"),
    ("key_len", "the name of metadata key 0 needs"),
    ("key_utf8", "not valid UTF-8"),
    ("name_utf8", "not valid UTF-8"),
    ("dup_key", "occurs twice"),
    ("dup_tensor", "occurs twice"),
    ("value_type", "unknown value type 13"),
    ("array_u8_huge", r"elements\) needs"),        # gguf.GGUFReader would loop ~2**62 times
    ("array_str_huge", r"elements\) needs"),
    ("array_nested", "nested more than 8 deep"),
    ("array_elem_type", "unknown element type 77"),
    ("string_huge", "needs 4611686018427387904 bytes"),
    ("alignment_zero", "general.alignment must be a uint32 power of two"),
    ("alignment_three", "general.alignment must be a uint32 power of two"),
    ("alignment_type", "general.alignment must be a uint32 power of two"),
    ("alignment_huge", "extends past the end"),
])
def test_hostile_headers(write, case, match):
    tensors = valid_tensors()
    kvs = meta()
    opts = {}
    if case == "magic":
        opts["magic"] = b"GGML"
    elif case.startswith("version"):
        opts["version"] = int(case[len("version"):])
    elif case == "n_kv":
        opts["n_kv"] = 2**63
    elif case == "n_tensors":
        opts["n_tensors"] = 2**60
    elif case == "key_len":
        kvs = [struct.pack("<Q", 2**62)] + kvs
    elif case == "key_utf8":
        kvs = [kv(b"\xff\xfe", U32, 1)] + kvs
    elif case == "name_utf8":
        tensors = [dict(tensors[0], name=b"blk.0.\xc3\x28")] + tensors[1:]
    elif case == "dup_key":
        kvs = kvs + [kv("qwen3moe.expert_count", U32, 2)]
    elif case == "dup_tensor":
        tensors = tensors + [tensors[-1]]
    elif case == "value_type":
        kvs = kvs + [kv("x", 13, b"")]
    elif case == "array_u8_huge":
        kvs = kvs + [kv("tokenizer.ggml.scores", ARR, struct.pack("<IQ", U8, 2**62))]
    elif case == "array_str_huge":
        kvs = kvs + [kv("tokenizer.ggml.tokens", ARR, struct.pack("<IQ", STR, 2**40))]
    elif case == "array_nested":
        kvs = kvs + [kv("x", ARR, struct.pack("<IQ", ARR, 1) * 12 + struct.pack("<IQ", U8, 0))]
    elif case == "array_elem_type":
        kvs = kvs + [kv("x", ARR, struct.pack("<IQ", 77, 1))]
    elif case == "string_huge":
        kvs = kvs + [kv("x", STR, struct.pack("<Q", 2**62))]
    elif case == "alignment_zero":
        kvs, opts["alignment"] = kvs + [kv("general.alignment", U32, 0)], 32
    elif case == "alignment_three":
        kvs = kvs + [kv("general.alignment", U32, 3)]
    elif case == "alignment_type":
        kvs = kvs + [kv("general.alignment", U64, 32)]
    elif case == "alignment_huge":
        kvs = kvs + [kv("general.alignment", U32, 2**31)]
    rejects(write(build(kvs, tensors, **opts)), match)


def test_the_reader_itself_would_hang_on_a_huge_array(write):
    """Why the header is walked before gguf.GGUFReader sees it: an array of 2**62 uint8 makes
    the reader (gguf 0.19) loop element by element past the end of the file, each read
    returning nothing and advancing nothing while its list of parts grows (~170 MB/s): a hang
    that ends when memory does. Ours rejects it at once, read_moe_config and load_blocks alike."""
    path = write(build(meta() + [kv("x", ARR, struct.pack("<IQ", U8, 2**62))], valid_tensors()))
    with time_limit(10):
        with pytest.raises(jg.GGUFError, match="4611686018427387904 elements"):
            jg.read_moe_config(path)
        with pytest.raises(jg.GGUFError):
            jg.load_blocks(path, progress=False)


def test_a_parsed_reader_is_checked_too(base, write, monkeypatch):
    """A gguf.GGUFReader passed in (the structure check cannot run) is checked tensor by
    tensor: a tensor whose bytes disagree with its shape is rejected by name."""
    reader = gguf.GGUFReader(write(base))
    t = reader.tensors[-1]
    reader.tensors[-1] = t._replace(data=t.data[:, :, :-1])  # as a short read would leave it
    with pytest.raises(jg.GGUFError, match=r"ffn_down_exps\.weight.*needs 17408 bytes"):
        jg.load_block_weights(reader, 0)


# -- fuzzing ---------------------------------------------------------------------------------

HEADER_LEN = data_start()
INTERESTING_U64 = [0, 1, 2, 3, 31, 32, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63, 2**64 - 1]
FUZZ_SEED = int(os.environ.get("JAX_MOE_FUZZ_SEED", "16"))
FUZZ_SECONDS = float(os.environ.get("JAX_MOE_FUZZ_SECONDS", "30")) * SCALE
KINDS = ["flip", "flip", "byte", "word", "truncate", "append", "multi", "offset", "offset", "dims", "type"]


def tensor_fields(data: bytes) -> list[dict]:
    """Byte positions of each tensor description's dims, type and offset in the base file."""
    out = []
    for t in valid_tensors():
        at = data.find(gstr(t["name"])) + len(gstr(t["name"])) + 4
        out.append(dict(dims=at, n_dims=len(t["dims"]), type=at + 8 * len(t["dims"]),
                        offset=at + 8 * len(t["dims"]) + 4))
    return out


def mutate(data: bytes, kind: str, seed: int, n: int, header_len: int) -> bytes:
    rng = np.random.default_rng(seed)
    b = bytearray(data)

    def pos():  # mostly in the header, where bytes have meaning
        return int(rng.integers(0, header_len)) if rng.random() < 0.85 else int(rng.integers(0, len(b)))
    if kind == "truncate":
        return bytes(b[:pos()])
    if kind == "append":
        return bytes(b) + rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    if kind in ("offset", "dims", "type"):  # a field of one tensor description
        f = tensor_fields(data)[int(rng.integers(0, len(valid_tensors())))]
        if kind == "type":
            v = int(rng.choice([0, 1, 2, 8, 10, 11, 12, 13, 14, 15, 16, 24, 30, 39, 99, 2**32 - 1]))
            b[f["type"]:f["type"] + 4] = struct.pack("<I", v)
            return bytes(b)
        at = f["offset"] if kind == "offset" else f["dims"] + 8 * int(rng.integers(0, f["n_dims"]))
        (old,) = struct.unpack_from("<Q", b, at)
        v = [old + int(rng.choice([-64, -32, -1, 1, 31, 32, 64, 4096])), int(rng.integers(0, 2**16)),
             INTERESTING_U64[int(rng.integers(0, len(INTERESTING_U64)))], old * 2, old // 2][int(rng.integers(0, 5))]
        b[at:at + 8] = struct.pack("<Q", v % 2**64)
        return bytes(b)
    for _ in range(n if kind == "multi" else 1):
        p = pos()
        op = kind if kind != "multi" else ["flip", "byte", "word"][int(rng.integers(0, 3))]
        if op == "flip":
            b[p] ^= 1 << int(rng.integers(0, 8))
        elif op == "byte":
            b[p] = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF]))
        else:
            v = INTERESTING_U64[int(rng.integers(0, len(INTERESTING_U64)))] if rng.random() < 0.8 \
                else int(rng.integers(0, 2**63))
            word = struct.pack("<Q", v)[:min(8, len(b) - p)]
            b[p:p + len(word)] = word
    return bytes(b)


def as_bf16(a) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def expected_experts(t) -> tuple:
    """What loading tensor ``t`` of gguf.GGUFReader must give: (format name, logical shape, uint8
    blocks) for the formats jax_moe runs, else ("bfloat16", shape, values rounded to bfloat16:
    dense values as stored, other formats decoded by gguf.quants)."""
    shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
    qt = QT(int(t.tensor_type))
    if qt.name in ("Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "MXFP4"):
        return qt.name, shape, np.asarray(t.data).reshape(shape[0], shape[1], -1)
    if qt == QT.BF16:
        values = np.asarray(t.data).view(ml_dtypes.bfloat16)
    elif qt in (QT.F16, QT.F32, QT.F64):
        values = np.asarray(t.data)
    else:
        with np.errstate(all="ignore"):  # scales that overflow decode to inf / NaN, in ours too
            values = gguf.quants.dequantize(np.asarray(t.data), qt)
    return "bfloat16", shape, as_bf16(values).reshape(shape)


def got_experts(leaf) -> tuple:
    if isinstance(leaf, QuantizedExperts):
        return leaf.qtype.name, tuple(leaf.shape), np.asarray(leaf.data)
    return "bfloat16", tuple(leaf.shape), np.asarray(leaf, np.float32)


def assert_weights_are_the_files(w, path) -> None:
    """A loaded block holds exactly what gguf.GGUFReader (a reader independent of jax_moe's)
    reads in the same file: every expert tensor's blocks or values, the router, E and k."""
    r = gguf.GGUFReader(path)
    pos = int(r.data_offset)
    for t in r.tensors:  # ggml's rule: each tensor's data at the aligned end of the one before
        assert int(t.data_offset) == pos, f"{t.name}: data at {int(t.data_offset)}, ggml reads it at {pos}"
        pos += -(-int(t.n_bytes) // int(r.alignment)) * int(r.alignment)
    ts = {t.name: t for t in r.tensors}
    get = lambda name: ts[f"blk.0.{name}.weight"]  # noqa: E731
    gate, up, down = (expected_experts(get(f"ffn_{n}_exps")) for n in ("gate", "up", "down"))
    if w.gate_up is not None:
        fmt, shape, data = got_experts(w.gate_up)
        assert (fmt, gate[0]) == (up[0], up[0]) and shape == (gate[1][0], 2 * gate[1][1], gate[1][2])
        np.testing.assert_array_equal(data, np.concatenate([gate[2], up[2]], axis=1))
    else:
        for leaf, want in ((w.gate, gate), (w.up, up)):
            fmt, shape, data = got_experts(leaf)
            assert (fmt, shape) == want[:2]
            np.testing.assert_array_equal(data, want[2])
    fmt, shape, data = got_experts(w.down)
    assert (fmt, shape) == down[:2]
    np.testing.assert_array_equal(data, down[2])
    router = get("ffn_gate_inp")
    want = np.asarray(router.data, np.float32).reshape(tuple(reversed([int(x) for x in router.shape])))
    np.testing.assert_array_equal(np.asarray(w.router), want.T)
    field = lambda key: r.get_field(key).contents()  # noqa: E731
    assert w.gate_up is None or w.gate_up.shape[0] == field("qwen3moe.expert_count")
    assert w.config.k == field("qwen3moe.expert_used_count")


def test_fuzz_mutated_files(tmp_path):
    """Seeded (JAX_MOE_FUZZ_SEED) and bounded in time (JAX_MOE_FUZZ_SECONDS, 30 s): mutations
    of a valid small file (bit flips, overwritten bytes and words, truncation, appended bytes,
    edited tensor offsets, dims and types). Every outcome is a GGUFError, a ValueError that says
    what is wrong, or a load whose weights are exactly what the file holds (read by
    gguf.GGUFReader) and that runs."""
    outcomes: dict[str, int] = {}
    base = base_bytes()
    path = tmp_path / "fuzz.gguf"
    t0 = time.perf_counter()
    case = 0
    while time.perf_counter() - t0 < FUZZ_SECONDS:
        rng = np.random.default_rng([FUZZ_SEED, case])
        kind = KINDS[int(rng.integers(0, len(KINDS)))]
        data = mutate(base, kind, int(rng.integers(0, 2**32)), int(rng.integers(1, 9)), HEADER_LEN + 64)
        path.write_bytes(data)
        where = f"case {case} (seed {FUZZ_SEED}, {kind})"
        try:
            w = load(path)
        except ValueError as e:  # GGUFError, or an argument error of a clear kind
            assert type(e) in (jg.GGUFError, ValueError) and len(str(e)) > 20, f"{where}: {e!r}"
            outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
        else:
            try:
                assert_weights_are_the_files(w, str(path))
                check_buffers(w)
            except Exception as e:
                raise AssertionError(f"{where}: loaded, but not what the file holds: {e}") from e
            outcomes["loaded"] = outcomes.get("loaded", 0) + 1
        case += 1
    print(f"{case} cases: {outcomes}")
    assert outcomes.get("loaded", 0) >= 10 and outcomes.get("GGUFError", 0) >= 50, outcomes
