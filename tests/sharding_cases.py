"""moe_matmul, moe_ffn and jax_moe.parallel on 8 CPU devices, against the single-device op.

Run by tests/test_sharding.py in a subprocess (``jax_num_cpu_devices`` must be set before JAX
starts a backend, and the rest of the suite runs with one device in its own process); it is
not collected on its own (the file name does not start with ``test_``). By hand::

    JAX_PLATFORMS=cpu python -m pytest tests/sharding_cases.py -q

Meshes (8,), (2, 4) and (4, 2); every partitioning rule (tokens T, experts E, output rows N,
contracting K, and their combinations) with dense weights in both layouts and GGUF weights
in both GGUF kinds; results equal to one device (bitwise where only T or N is sharded); the
compiled HLO never moves expert weights between devices.
"""

from __future__ import annotations

import jax

jax.config.update("jax_num_cpu_devices", 8)

import dataclasses  # noqa: E402
import functools  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import jax_moe  # noqa: E402
from jax_moe import MoeKind, QuantizedExperts, moe_matmul, moe_matmul_p, quantize  # noqa: E402
from jax_moe.ffn import MoEWeights, moe_ffn  # noqa: E402
from jax_moe.parallel import ExpertParallel, expert_parallel_ffn  # noqa: E402
from jax_moe.partitioning import local_expert_ids  # noqa: E402
from jax_moe.routing import RouterConfig  # noqa: E402

from sharding_hlo import collectives_from_params  # noqa: E402

# T's shards (24, 12, 6, 3) never look like E's (8, 4, 2, 1), so the shapes are unambiguous.
T, k, E, N = 24, 2, 8, 48

MESHES = {"8": ((8,), ("a",)), "2x4": ((2, 4), ("a", "b")), "4x2": ((4, 2), ("a", "b"))}

#: Rules by mesh rank: factor -> mesh axes (t tokens, e experts, n output rows, c contracting K,
#: j the k pairs of a token).
RULES_1D = {
    "T": {"t": "a"},
    "E": {"e": "a"},
    "N": {"n": "a"},
    "K": {"c": "a"},
    "T=E": {"t": "a", "e": "a"},  # one axis on tokens and experts: gather x, reduce-scatter out
}
RULES_2D = {
    "T,E": {"t": "a", "e": "b"},
    "E,N": {"e": "a", "n": "b"},
    "T,K": {"t": "a", "c": "b"},
    "K,E": {"c": "a", "e": "b"},
    "T,N": {"t": "b", "n": "a"},
    "E2": {"e": ("a", "b")},
    "T,J": {"t": "large", "j": "small"},  # k pairs split over the size-2 axis
    "T2": {"t": ("a", "b")},
}

#: Weight variants: (kind, x dtype, weight format, layout, K).
WEIGHTS = {
    "wmma-enk-bf16": (MoeKind.WMMA, "bfloat16", None, "enk", 64),
    "wmma-ekn-f16": (MoeKind.WMMA, "float16", None, "ekn", 64),
    "wmma_gguf-q8_0": (MoeKind.WMMA_GGUF, "bfloat16", "Q8_0", "enk", 64),
    "scalar_gguf-q4_k": (MoeKind.SCALAR_GGUF, "float32", "Q4_K", "enk", 256),
}


def rule_cases():
    """Every mesh x rule with dense and GGUF weights, each both reduced and per pair; which
    layout (or GGUF kind) takes which of the two alternates from mesh to mesh."""
    for m, (mesh_name, (shape, _)) in enumerate(MESHES.items()):
        rules = RULES_1D if len(shape) == 1 else RULES_2D
        for rule_name, rule in rules.items():
            for i, (wname, (kind, *_rest)) in enumerate(WEIGHTS.items()):
                if "c" in rule and kind != MoeKind.WMMA:
                    continue  # GGUF blocks are never split along K
                reduce = (i + m) % 2 == 0
                yield pytest.param(mesh_name, rule, wname, reduce,
                                   id=f"{mesh_name}-{rule_name}-{wname}-{'reduce' if reduce else 'pairs'}")


def make_mesh(name: str, explicit: bool = False) -> jax.sharding.Mesh:
    shape, axes = MESHES[name]
    t = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(shape, axes, axis_types=(t,) * len(axes))


@dataclasses.dataclass
class Operands:
    x: jax.Array
    ids: jax.Array
    w: object
    scores: jax.Array
    kind: MoeKind
    layout: str
    out_dtype: str


def make_operands(rng, wname: str, x_rank: int) -> Operands:
    kind, dtype, fmt, layout, K = WEIGHTS[wname]
    xs = (T, k, K) if x_rank == 3 else (T, K)
    x = jnp.asarray(rng.standard_normal(xs), dtype)
    ids = rng.integers(-1, E + 1, size=(T, k)).astype(np.int32)  # includes ids outside [0, E)
    ids[0, 0], ids[1, 1] = -1, E
    scores = jnp.asarray(rng.uniform(0.1, 1.0, (T, k)), jnp.float32)
    w32 = (rng.standard_normal((E, N, K)) / np.sqrt(K)).astype(np.float32)
    if fmt is None:
        w = jnp.asarray(w32 if layout == "enk" else np.swapaxes(w32, 1, 2), dtype)
    else:
        w = quantize(w32, fmt)
        w = QuantizedExperts(jnp.asarray(w.data), w.qtype, w.shape)
    out = "float32" if kind == MoeKind.SCALAR_GGUF else dtype
    return Operands(x, jnp.asarray(ids), w, scores, kind, layout, out)


def specs_for(rule: dict, op: Operands, x_rank: int) -> tuple[P, P, P]:
    """PartitionSpecs of x, of w (its data for GGUF weights) and of ids/scores for a rule."""
    t, e, n, c, j = (rule.get(f) for f in "tencj")
    x = P(t, c) if x_rank == 2 else P(t, j, c)
    if isinstance(op.w, QuantizedExperts) or op.layout == "enk":
        w = P(e, n, c)
    else:
        w = P(e, c, n)
    return x, w, P(t, j)


def resolve(rule: dict, mesh) -> dict:
    """Rules may name the "small" (size 2) and "large" axis of a 2-d mesh."""
    by_size = sorted(mesh.axis_names, key=lambda a: mesh.shape[a])
    names = {"small": by_size[0], "large": by_size[-1]}
    return {f: names.get(a, a) if isinstance(a, str) else a for f, a in rule.items()}


def put(a, mesh, spec):
    return jax.device_put(a, NamedSharding(mesh, spec))


def assert_matches(out, ref, *, exact: bool, out_dtype: str) -> None:
    """Bitwise equal, or equal up to float32 reassociation then one rounding to out_dtype."""
    out = np.asarray(jnp.asarray(out).astype(jnp.float32))
    ref = np.asarray(jnp.asarray(ref).astype(jnp.float32))
    assert out.shape == ref.shape
    if exact:
        np.testing.assert_array_equal(out, ref)
        return
    scale = float(np.abs(ref).max())
    rtol = {"float32": 1e-5, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}[out_dtype]
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=1e-6 * scale)


def vma(a) -> frozenset:
    """The manual mesh axes a value varies over inside shard_map (check_vma=True)."""
    aval = jax.typeof(a)
    v = getattr(aval, "vma", None)
    return frozenset(v if v is not None else aval.manual_axis_type.varying)


def weight_moves(compiled_text: str, params: set[int]) -> list[str]:
    return collectives_from_params(compiled_text, params)


# -- the partitioning rule under jax.jit --------------------------------------------------------
@pytest.mark.parametrize("mesh_name,rule,wname,reduce", list(rule_cases()))
def test_jit_rule(rng, mesh_name, rule, wname, reduce):
    quantized = WEIGHTS[wname][2] is not None
    x_rank = 3 if reduce == quantized else 2  # both ranks for every kind
    op = make_operands(rng, wname, x_rank)
    ref = moe_matmul(op.x, op.ids, op.w, op.scores, reduce=reduce, weight_layout=op.layout)
    mesh = make_mesh(mesh_name)
    rule = resolve(rule, mesh)
    xs, ws, ts = specs_for(rule, op, x_rank)
    args = (put(op.x, mesh, xs), put(op.ids, mesh, ts), put(op.w, mesh, ws), put(op.scores, mesh, ts))
    f = jax.jit(functools.partial(moe_matmul, reduce=reduce, weight_layout=op.layout))
    out = f(*args)
    j_split = "j" in rule and k % mesh.shape[rule["j"]] == 0
    sums = "c" in rule or (reduce and ("e" in rule or j_split))
    assert_matches(out, ref, exact=not sums, out_dtype=op.out_dtype)
    assert out.dtype == ref.dtype
    text = f.lower(*args).compile().as_text()
    assert "jax_moe_matmul" in text
    assert not weight_moves(text, {2}), weight_moves(text, {2})
    if "e" in rule and "t" not in rule:  # experts split: each device computes its own pairs
        assert "all-reduce" in text or "reduce-scatter" in text


def test_hlo_check_catches_weight_gathers(rng):
    """The HLO reader flags the all-gather XLA inserts for a custom call without our rule."""
    op = make_operands(rng, "wmma-enk-bf16", 2)
    mesh = make_mesh("8")
    f = jax.jit(lambda x, ids, w, s: moe_matmul_p.bind(
        x, ids, w, s, kind=1, wtype=30, layout=0, reduce=True, out_dtype=np.dtype("bfloat16")))
    text = f.lower(op.x, op.ids, put(op.w, mesh, P("a")), op.scores).compile().as_text()
    assert weight_moves(text, {2})


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_explicit_axes_and_out_shardings(rng, mesh_name):
    """Explicit mesh axes (jax.make_mesh's default) and a requested output sharding."""
    op = make_operands(rng, "wmma_gguf-q8_0", 2)
    ref = moe_matmul(op.x, op.ids, op.w, op.scores)
    mesh = make_mesh(mesh_name, explicit=True)
    last = mesh.axis_names[-1]
    first = mesh.axis_names[0]
    args = (put(op.x, mesh, P(first)), put(op.ids, mesh, P(first)), put(op.w, mesh, P(last)),
            put(op.scores, mesh, P(first)))
    f = jax.jit(lambda *a: moe_matmul(*a), out_shardings=NamedSharding(mesh, P(first)))
    out = f(*args)
    assert_matches(out, ref, exact=False, out_dtype=op.out_dtype)
    assert out.sharding.spec == P(first)
    assert not weight_moves(f.lower(*args).compile().as_text(), {2})


def test_eager_call_on_sharded_arrays(rng):
    """Outside jit, sharded operands are partitioned the same way (no weight gather)."""
    op = make_operands(rng, "wmma-enk-bf16", 3)
    mesh = make_mesh("2x4")
    ref = moe_matmul(op.x, op.ids, op.w, op.scores, reduce=False)
    out = moe_matmul(put(op.x, mesh, P("a")), put(op.ids, mesh, P("a")), put(op.w, mesh, P("b")),
                     put(op.scores, mesh, P("a")), reduce=False)
    assert_matches(out, ref, exact=True, out_dtype=op.out_dtype)
    assert out.sharding.spec[0] == "a"


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_vmap_inside_sharded_jit(rng, mesh_name):
    """vmap folds its batch into T (x) and E (w) without moving the sharded blocks."""
    mesh = make_mesh(mesh_name)
    last = mesh.axis_names[-1]
    ops = [make_operands(rng, "wmma-ekn-f16", 2) for _ in range(2)]
    xs = jnp.stack([o.x for o in ops])
    ws = jnp.stack([o.w for o in ops])
    f = jax.jit(jax.vmap(lambda x, w: moe_matmul(x, ops[0].ids, w, ops[0].scores, weight_layout="ekn")))
    args = (put(xs, mesh, P(None, mesh.axis_names[0])), put(ws, mesh, P(None, last)))
    out = f(*args)
    for b, o in enumerate(ops):
        ref = moe_matmul(o.x, ops[0].ids, o.w, ops[0].scores, weight_layout="ekn")
        assert_matches(out[b], ref, exact=False, out_dtype=o.out_dtype)
    assert not weight_moves(f.lower(*args).compile().as_text(), {1})


def test_vmap_over_a_sharded_batch_with_explicit_axes(rng):
    """A vmapped batch axis that is itself sharded (explicit axes) folds batch-major: no moves."""
    mesh = make_mesh("4x2", explicit=True)
    B = 4
    ops = [make_operands(rng, "wmma-enk-bf16", 2) for _ in range(B)]
    st = lambda f: put(jnp.stack([f(o) for o in ops]), mesh, P("a"))  # noqa: E731
    args = (st(lambda o: o.x), st(lambda o: o.ids), st(lambda o: o.w), st(lambda o: o.scores))
    f = jax.jit(jax.vmap(lambda *a: moe_matmul(*a, reduce=False)))
    out = np.asarray(f(*args).astype(jnp.float32))
    for b, o in enumerate(ops):
        ref = moe_matmul(o.x, o.ids, o.w, o.scores, reduce=False)
        assert_matches(out[b], ref, exact=True, out_dtype=o.out_dtype)
    assert not weight_moves(f.lower(*args).compile().as_text(), {2})


def test_gspmd_propagation_path(rng):
    """With Shardy off, GSPMD's propagation callbacks give the same partitioning."""
    op = make_operands(rng, "wmma-enk-bf16", 2)
    ref = moe_matmul(op.x, op.ids, op.w, op.scores)
    mesh = make_mesh("4x2")
    args = (put(op.x, mesh, P("a")), put(op.ids, mesh, P("a")), put(op.w, mesh, P("b")),
            put(op.scores, mesh, P("a")))
    jax.config.update("jax_use_shardy_partitioner", False)
    try:
        f = jax.jit(lambda *a: moe_matmul(*a))
        out = f(*args)
        text = f.lower(*args).compile().as_text()
    finally:
        jax.config.update("jax_use_shardy_partitioner", True)
    assert_matches(out, ref, exact=False, out_dtype=op.out_dtype)
    assert not weight_moves(text, {2})


# -- shard_map with check_vma=True ---------------------------------------------------------------
@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("wname", ["wmma-enk-bf16", "scalar_gguf-q4_k"])
def test_shard_map_local_experts(rng, mesh_name, wname):
    """Expert parallelism written by hand in shard_map (check_vma=True): local ids, one psum."""
    mesh = make_mesh(mesh_name, explicit=True)
    data, expert = (None, "a") if len(mesh.axis_names) == 1 else ("a", "b")
    op = make_operands(rng, wname, 2)
    ref = moe_matmul(op.x, op.ids, op.w, op.scores, out_dtype=jnp.float32)

    def body(x, ids, w, scores):
        if isinstance(w, QuantizedExperts):
            w = QuantizedExperts(w.data, w.qtype, (w.data.shape[0], w.N, w.K))
        e_local = w.shape[0]
        local = local_expert_ids(ids, expert, e_local)
        y = moe_matmul(x, local, w, scores, out_dtype=jnp.float32)
        # w varies over the expert axis, x over the data axis: the output varies over both.
        assert vma(y) == frozenset(a for a in (data, expert) if a)
        return jax.lax.psum(y, expert)

    tok = P(data)
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, P(expert), tok), out_specs=tok,
                              check_vma=True))
    args = (put(op.x, mesh, tok), put(op.ids, mesh, tok), put(op.w, mesh, P(expert)),
            put(op.scores, mesh, tok))
    out = f(*args)
    assert_matches(out, ref, exact=False, out_dtype="float32")
    assert not weight_moves(f.lower(*args).compile().as_text(), {2})


def test_shard_map_vma_of_each_operand(rng):
    """The output varies over the union of the operands' varying axes (check_vma=True)."""
    mesh = make_mesh("2x4", explicit=True)
    op = make_operands(rng, "wmma-enk-bf16", 2)
    ref = moe_matmul(op.x, op.ids, op.w, op.scores)
    for x_axes, w_axes, s_axes in [((), (), ()), ((), (), ("b",)), ((), ("a",), ()),
                                   (("a",), (), ("b",)), ((), ("a",), ("a", "b"))]:
        seen = {}

        def vary(v, axes):  # the same values, typed as varying over `axes`
            for a in axes:
                v = v * (jax.lax.axis_index(a) * 0 + 1).astype(v.dtype)
            return v

        def body(x, ids, w, scores):
            y = moe_matmul(vary(x, x_axes), ids, vary(w, w_axes), vary(scores, s_axes))
            seen["vma"] = vma(y)
            for a in seen["vma"]:
                y = jax.lax.pmax(y, a)  # back to invariant: every device holds the same values
            return y

        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=True))
        out = f(op.x, op.ids, op.w, op.scores)
        assert seen["vma"] == frozenset(x_axes + w_axes + s_axes)
        assert_matches(out, ref, exact=True, out_dtype=op.out_dtype)


@pytest.mark.parametrize("with_mesh", [False, True])
def test_shard_map_partially_manual(rng, with_mesh):
    """shard_map over some axes (axis_names=...): correct, replicated over the automatic ones."""
    mesh = make_mesh("2x4")
    op = make_operands(rng, "wmma_gguf-q8_0", 3)
    ref = moe_matmul(op.x, op.ids, op.w, op.scores, reduce=False)
    f = jax.jit(jax.shard_map(lambda *a: moe_matmul(*a, reduce=False), mesh=mesh,
                              in_specs=(P("a"), P("a"), P(), P("a")), out_specs=P("a"),
                              axis_names={"a"}))
    args = (put(op.x, mesh, P("a")), put(op.ids, mesh, P("a")), put(op.w, mesh, P("b")),
            put(op.scores, mesh, P("a")))
    if with_mesh:
        with jax.set_mesh(mesh):
            out = f(*args)
    else:
        out = f(*args)
    assert_matches(out, ref, exact=True, out_dtype=op.out_dtype)


# -- moe_ffn and jax_moe.parallel -----------------------------------------------------------------
D, F, Fs = 64, 32, 32


def ffn_weights(rng, fmt: str | None, layout: str = "enk", dtype=jnp.bfloat16):
    gu = (rng.standard_normal((E, 2 * F, D)) / np.sqrt(D)).astype(np.float32)
    dn = (rng.standard_normal((E, D, F)) / np.sqrt(F)).astype(np.float32)
    if fmt is not None:
        return quantize(gu, fmt), quantize(dn, fmt)
    if layout == "ekn":
        gu, dn = np.swapaxes(gu, 1, 2), np.swapaxes(dn, 1, 2)
    return jnp.asarray(gu, dtype), jnp.asarray(dn, dtype)


def tokens(rng, lead=(T,), dtype=jnp.bfloat16):
    x = jnp.asarray(rng.standard_normal(lead + (D,)), dtype)
    ids = jnp.asarray(rng.integers(-1, E + 1, lead + (k,)), jnp.int32)
    scores = jnp.asarray(rng.uniform(0.1, 1.0, lead + (k,)), jnp.float32)
    return x, ids, scores


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_moe_ffn_under_jit_with_sharded_experts(rng, mesh_name):
    """Plain moe_ffn under jit: experts split along E, tokens along the other axis."""
    mesh = make_mesh(mesh_name)
    expert = mesh.axis_names[-1]
    data = mesh.axis_names[0] if len(mesh.axis_names) > 1 else None
    x, ids, scores = tokens(rng)
    gu, dn = ffn_weights(rng, None)
    ref = moe_ffn(x, ids, scores, gu, dn)
    f = jax.jit(lambda *a: moe_ffn(*a))
    args = (put(x, mesh, P(data)), put(ids, mesh, P(data)), put(scores, mesh, P(data)),
            put(gu, mesh, P(expert)), put(dn, mesh, P(expert)))
    assert_matches(f(*args), ref, exact=False, out_dtype="bfloat16")
    assert not weight_moves(f.lower(*args).compile().as_text(), {3, 4})


def parallel_cases():
    for mesh_name in MESHES:
        for fmt in (None, "Q8_0"):
            for over in (True, False):
                tokens = "tokens_over_experts" if over else "tokens_per_data"
                yield pytest.param(mesh_name, fmt, over, id=f"{mesh_name}-{fmt or 'bf16'}-{tokens}")


@pytest.mark.parametrize("mesh_name,fmt,over", list(parallel_cases()))
def test_parallel_ffn(rng, mesh_name, fmt, over):
    """jax_moe.parallel: data axis x expert axis, one combination per FFN, no weight moves."""
    shape, _ = MESHES[mesh_name]
    axes = ("expert",) if len(shape) == 1 else ("data", "expert")
    mesh = jax.make_mesh(shape, axes)
    ep = ExpertParallel(mesh, data_axis=None if len(shape) == 1 else "data", tokens_over_experts=over)
    x, ids, scores = tokens(rng, lead=(8, 3))
    gu, dn = ffn_weights(rng, fmt)
    ref = moe_ffn(x, ids, scores, gu, dn)
    args = (ep.shard_tokens(x), ep.shard_tokens(ids), ep.shard_tokens(scores),
            ep.shard_experts(gu), ep.shard_experts(dn))
    f = jax.jit(lambda *a: ep.ffn(*a))
    out = f(*args)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_matches(out, ref, exact=False, out_dtype="bfloat16")
    assert out.sharding.spec[0] in (ep.token_spec[0],)
    text = f.lower(*args).compile().as_text()
    assert not weight_moves(text, {3, 4}), weight_moves(text, {3, 4})
    # one combination of the partial outputs per FFN
    n_comb = text.count(" all-reduce(") + text.count(" reduce-scatter(")
    assert n_comb == 1, n_comb


@pytest.mark.parametrize("mesh_name,biases", [("2x4", False), ("4x2", False), ("2x4", True)])
def test_parallel_block_with_shared_expert(rng, mesh_name, biases):
    """ExpertParallel.block: router + experts (+ gpt-oss's expert biases) + gated shared
    expert, equal to MoEWeights(x)."""
    shape, _ = MESHES[mesh_name]
    mesh = jax.make_mesh(shape, ("data", "expert"))
    ep = ExpertParallel(mesh)
    gu, dn = ffn_weights(rng, None, layout="ekn")
    extra = {}
    if biases:
        extra = dict(gate_up_bias=jnp.asarray(rng.standard_normal((E, 2 * F)), jnp.float32),
                     down_bias=jnp.asarray(rng.standard_normal((E, D)), jnp.float32), activation="gpt_oss")
    w = MoEWeights(
        router=jnp.asarray(rng.standard_normal((D, E)), jnp.float32), down=dn, gate_up=gu,
        shared_gate_up=jnp.asarray(rng.standard_normal((1, D, 2 * Fs)) / 8, jnp.bfloat16),
        shared_down=jnp.asarray(rng.standard_normal((1, Fs, D)) / 6, jnp.bfloat16),
        shared_expert_gate=jnp.asarray(rng.standard_normal(D), jnp.float32),
        config=RouterConfig(k=2), weight_layout="ekn", **extra)
    x = jnp.asarray(rng.standard_normal((16, 2, D)), jnp.bfloat16)
    ref, (ref_ids, _) = w(x, return_routing=True)
    sw = ep.shard_weights(w)
    assert sw.down.sharding.spec == P("expert") and sw.router.sharding.spec == P()
    if biases:
        assert sw.down_bias.sharding.spec == P("expert")
        no_bias = dataclasses.replace(w, gate_up_bias=None, down_bias=None)(x)
        assert np.abs(np.asarray(no_bias, np.float32) - np.asarray(ref, np.float32)).max() > 0.1
    out, (ids, _) = jax.jit(lambda x, w: ep.block(x, w, return_routing=True))(x, sw)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_ids))
    assert_matches(out, ref, exact=False, out_dtype="bfloat16")


def test_parallel_functional_form_and_errors(rng):
    mesh = jax.make_mesh((2, 4), ("data", "expert"))
    x, ids, scores = tokens(rng, lead=(8,))
    gu, dn = ffn_weights(rng, "Q8_0")
    ref = moe_ffn(x, ids, scores, gu, dn, activation="geglu")
    out = expert_parallel_ffn(x, ids, scores, gu, dn, mesh=mesh, activation="geglu")
    assert_matches(out, ref, exact=False, out_dtype="bfloat16")
    with pytest.raises(ValueError, match="multiple of 8"):
        expert_parallel_ffn(x[:4], ids[:4], scores[:4], gu, dn, mesh=mesh)
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        ExpertParallel(mesh, expert_axis="experts")
    small = quantize(np.zeros((6, 2 * F, D), np.float32), "Q8_0")
    with pytest.raises(ValueError, match="E = 6 experts cannot be split"):
        ExpertParallel(mesh).shard_experts(small)


def test_flax_module_with_sharded_experts(rng):
    """A Flax NNX MoE whose expert parameters carry partitioning metadata (``out_sharding``)
    is placed with nnx.get_named_sharding and runs under nnx.jit, plainly (the partitioning
    rule) and through ExpertParallel.block, equal to the unsharded module."""
    nnx = pytest.importorskip("flax.nnx")
    import jax_moe.nnx as moe_nnx

    mesh = jax.make_mesh((2, 4), ("data", "expert"))
    ep = ExpertParallel(mesh)
    m = moe_nnx.MoE(D, F, E, router=2, rngs=nnx.Rngs(int(rng.integers(2**31))))
    x = jnp.asarray(rng.standard_normal((8, D)), jnp.bfloat16)
    ref = m(x)
    for name in ("gate_up", "down"):  # what MoE(expert_parallel=ep) is to do itself
        getattr(m, name).set_metadata(out_sharding=ep.expert_sharding)
    state = nnx.state(m)
    specs = nnx.get_partition_spec(state)
    assert specs["gate_up"].get_value() == P("expert", None, None)
    assert specs["router_kernel"].get_value() == P()
    nnx.update(m, jax.device_put(state, nnx.get_named_sharding(state, mesh)))
    assert m.gate_up[...].sharding.spec == P("expert", None, None)
    xs = ep.shard_tokens(x)
    out = nnx.jit(lambda m, x: m(x))(m, xs)
    assert_matches(out, ref, exact=False, out_dtype="bfloat16")
    out = nnx.jit(lambda m, x: ep.block(x, m.weights()))(m, xs)
    assert_matches(out, ref, exact=False, out_dtype="bfloat16")
    if "expert_parallel" in moe_nnx.MoE.__init__.__code__.co_varnames:  # the module's own kwarg
        with jax.set_mesh(mesh):
            m2 = moe_nnx.MoE(D, F, E, router=2, expert_parallel=ep, rngs=nnx.Rngs(0))
        specs = nnx.get_partition_spec(nnx.state(m2))
        assert specs["gate_up"].get_value() == P("expert", None, None)
        assert specs["down"].get_value() == P("expert", None, None)
        assert m2.down[...].sharding.spec == P("expert", None, None)


def test_version_and_device_count():
    assert len(jax.devices()) == 8
    assert jax_moe.moe_matmul is moe_matmul


def test_quantize_keeps_the_sharding_and_metadata_of_each_expert_weight(rng):
    """MoE.quantize (NNX and Linen) keeps each expert weight's sharding and partitioning
    metadata: E and N on their mesh axes, K's axis dropped (blocks are never split)."""
    nnx = pytest.importorskip("flax.nnx")
    import flax.linen as nn
    import jax_moe.linen as moe_linen
    import jax_moe.nnx as moe_nnx

    mesh = jax.make_mesh((2, 4), ("data", "expert"))
    x = jnp.asarray(rng.standard_normal((8, D)), jnp.bfloat16)
    m = moe_nnx.MoE(D, F, E, router=2, shared_hidden_features=F, rngs=nnx.Rngs(int(rng.integers(2**31))))
    # gate_up [E, D, 2F] ("ekn"): experts over "expert"; down [E, F, D]: N (= D) over "data"
    m.gate_up.set_metadata(out_sharding=("expert", None, None))
    m.down.set_metadata(out_sharding=(None, None, "data"))
    m.shared_gate_up.set_metadata(out_sharding=("data", None))  # K of the shared expert
    ref = nnx.clone(m).quantize("Q8_0")  # on one device
    state = nnx.state(m)
    nnx.update(m, jax.device_put(state, nnx.get_named_sharding(state, mesh)))
    m.quantize("Q8_0")
    assert m.gate_up[...].sharding.spec == P("expert", None, None)
    assert m.gate_up.get_metadata()["out_sharding"] == ("expert", None, None)
    assert m.down[...].sharding.spec == P(None, "data", None)  # [E, N, Kb]: N kept
    assert m.down.get_metadata()["out_sharding"] == (None, "data", None)
    assert m.shared_gate_up[...].sharding.spec == P(None, None, None)  # K's axis dropped
    assert m.gate_up[...].sharding.mesh == mesh and len(m.gate_up[...].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(m.gate_up[...]), np.asarray(ref.gate_up[...]))
    out = nnx.jit(lambda m, x: m(x))(m, x)
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(nnx.jit(lambda m, x: m(x))(ref, x), np.float32))

    init = nn.with_partitioning(moe_linen._modules.default_kernel_init("ekn"), ("expert", None, None))
    lm = moe_linen.MoE(D, F, E, router=2, kernel_init=init)
    variables = lm.init(jax.random.key(0), x)
    assert isinstance(variables["experts"]["gate_up"], nn.Partitioned)
    shardings = nn.get_sharding(variables, mesh)
    variables = jax.device_put(variables, shardings)
    qm, qv = lm.quantize(variables, "Q8_0")
    box = qv["quantized"]["gate_up"]
    assert isinstance(box, nn.Partitioned) and box.names == ("expert", None, None)
    assert box.value.sharding.spec == P("expert", None, None)
    assert box.value.sharding.mesh == mesh
    qout = jax.jit(qm.apply)(qv, x)
    plain = jax.device_put(jax.tree_util.tree_map(np.asarray, nn.unbox(qv)), jax.devices()[0])
    np.testing.assert_array_equal(np.asarray(qout, np.float32),
                                  np.asarray(jax.jit(qm.apply)(plain, x), np.float32))
