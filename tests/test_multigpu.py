"""The sharding cases of the CPU suite (tests/sharding_cases.py) on two or more CUDA devices.

Every test carries the ``multigpu`` marker: it skips itself (tests/conftest.py) when fewer than
two CUDA devices are visible. On n visible GPUs the meshes are derived from n' = the largest
power of two <= min(n, 8) (so that E = 8 experts and T = 24 tokens split evenly):
(n',), (2, n'/2), (n'/2, 2) when n' >= 4, else (n',) and (1, n'); the CPU suite's cases on its
meshes "8", "2x4" and "4x2" run on the corresponding mesh here. Each result is compared with
the same op on one device (the first GPU); the compiled HLO must move no expert weights.

Run on a multi-GPU machine::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        python -m pytest tests/test_multigpu.py -m multigpu -v

Dry run of the same test bodies on 8 host CPU devices (run this file alone: the switch makes
tests/conftest.py see the CPU devices as the "CUDA" devices of this session)::

    JAX_MOE_MULTIGPU_DRYRUN_CPU=8 JAX_PLATFORMS=cpu python -m pytest tests/test_multigpu.py -m multigpu

NVLink multicast stays off: the NVLS variables are set here (NCCL reads them when it creates
its communicators, at the first collective), and should be set in the shell too.
"""

from __future__ import annotations

import os
import re
import sys

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
               ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_k] = _v

import functools  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AxisType, PartitionSpec as P  # noqa: E402

#: Dry run: this many host CPU devices stand in for the GPUs.
DRY = int(os.environ.get("JAX_MOE_MULTIGPU_DRYRUN_CPU") or 0)


def _import_cases():
    """tests/sharding_cases.py sets jax_num_cpu_devices = 8 when imported, which raises once a
    backend has started (earlier test modules start one); that setting is irrelevant here."""
    try:
        import sharding_cases
    except RuntimeError as e:
        if "jax_num_cpu_devices" not in str(e):
            raise
        update = jax.config.update
        jax.config.update = lambda name, value: (None if name == "jax_num_cpu_devices"
                                                 else update(name, value))
        try:
            import sharding_cases
        finally:
            del jax.config.update  # back to the class's method
    return sharding_cases


sc = _import_cases()

from jax_moe import QuantizedExperts, moe_matmul  # noqa: E402
from jax_moe.ffn import MoEWeights, moe_ffn  # noqa: E402
from jax_moe.parallel import ExpertParallel  # noqa: E402
from jax_moe.partitioning import local_expert_ids  # noqa: E402
from jax_moe.routing import RouterConfig  # noqa: E402

if DRY:
    try:
        jax.config.update("jax_num_cpu_devices", DRY)
    except RuntimeError:
        pass  # too late: test_devices says so
    _conftest = sys.modules.get("conftest")
    if _conftest is not None and hasattr(_conftest, "cuda_devices"):
        _conftest.cuda_devices = lambda: jax.devices("cpu")  # the conftest's skip and placement

pytestmark = pytest.mark.multigpu


def visible_devices() -> list:
    if DRY:
        return jax.devices("cpu")[:DRY]
    try:
        return jax.devices("cuda")
    except RuntimeError:
        return []


DEVS = visible_devices()
#: Devices used: the largest power of two <= min(visible, 8); 8 (ids only) when < 2 are visible.
N_DEV = 1 << int(math.log2(min(len(DEVS), 8))) if len(DEVS) >= 2 else 8


def mesh_shapes(n: int) -> dict[str, tuple[int, ...]]:
    """The CPU suite's mesh names -> this machine's mesh shapes."""
    if n >= 4:
        return {"8": (n,), "2x4": (2, n // 2), "4x2": (n // 2, 2)}
    return {"8": (n,), "2x4": (1, n), "4x2": (1, n)}


SHAPES = mesh_shapes(N_DEV)


def shape_name(shape) -> str:
    return "x".join(map(str, shape))


def make_mesh(shape, axes=None, explicit: bool = False) -> jax.sharding.Mesh:
    axes = axes or ("a", "b")[:len(shape)]
    t = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(shape, axes, axis_types=(t,) * len(axes), devices=DEVS[:math.prod(shape)])


def on_one():
    """The single-device reference runs on the first device."""
    return jax.default_device(DEVS[0])


def axes_of(v) -> tuple[str, ...]:
    return () if v is None else ((v,) if isinstance(v, str) else tuple(v))


def size(mesh, v) -> int:
    return math.prod(int(mesh.shape[a]) for a in axes_of(v))


# -- reading the compiled HLO ---------------------------------------------------------------------
def compiled_text(lowered) -> str:
    """Compiled HLO text. On GPUs, without command buffers: they wrap the custom call and its
    neighbours in `call`s, which tests/sharding_hlo.py's entry-computation reader cannot see into
    (the SPMD partitioning, which decides what moves, is the same)."""
    if DEVS and DEVS[0].platform != "cpu":
        return lowered.compile(compiler_options={"xla_gpu_enable_command_buffer": ""}).as_text()
    return lowered.compile().as_text()


_COLLECTIVE = re.compile(r"\s(all-gather|all-gather-start|all-to-all|ragged-all-to-all|collective-permute|"
                         r"collective-permute-start|all-reduce|all-reduce-start|reduce-scatter|"
                         r"collective-broadcast)\(")
_SHAPE = re.compile(r"\b(pred|bf16|f16|f32|f64|[su]\d+)\[([\d,]*)\]")


def _shard_shapes(w, n: int) -> set:
    """Every shape of a weight's dims split over at most n devices (the whole shape included)."""
    dims = tuple((w.data if isinstance(w, QuantizedExperts) else w).shape)
    divs = [d for d in range(1, n + 1) if n % d == 0]
    out = {dims}
    for fs in np.ndindex(*(len(divs),) * len(dims)):
        f = [divs[i] for i in fs]
        if math.prod(f) <= n and all(d % g == 0 for d, g in zip(dims, f)):
            out.add(tuple(d // g for d, g in zip(dims, f)))
    return out


def weight_shaped_collectives(text: str, weights, n: int) -> list[str]:
    """Collectives anywhere in the module (async wrappers included) whose result (or operand,
    where printed) has the shape of a whole or split expert weight, in any dtype (XLA may
    convert before moving): a check independent of sharding_hlo's data-flow reader (weights
    are rank 3 with E's shards 8, 4, 2, 1 leading; no activation here has such a shape)."""
    shapes = set().union(*(_shard_shapes(w, n) for w in weights))
    hits = []
    for line in text.splitlines():
        if _COLLECTIVE.search(line):
            if any(tuple(int(d) for d in dims.split(",") if d) in shapes
                   for _dt, dims in _SHAPE.findall(line)):
                hits.append(line.strip())
    return hits


def combinations(text: str) -> int:
    """all-reduce / reduce-scatter ops anywhere in the module (async forms counted once)."""
    return len(re.findall(r"\s(?:all-reduce|all-reduce-start|reduce-scatter)\(", text))


def assert_no_weight_moves(text: str, params: set[int], weights) -> None:
    moves = sc.weight_moves(text, params)
    assert not moves, moves
    shaped = weight_shaped_collectives(text, weights, N_DEV)
    assert not shaped, shaped


# -- the cases --------------------------------------------------------------------------------------
def test_devices():
    if DRY:
        assert len(DEVS) == DRY, (f"JAX_MOE_MULTIGPU_DRYRUN_CPU={DRY} but {len(DEVS)} CPU devices: "
                                  "run this file alone, with JAX_PLATFORMS=cpu")
    assert len(DEVS) >= 2 and N_DEV >= 2
    mesh = make_mesh(SHAPES["2x4"])
    assert mesh.devices.size == N_DEV
    assert {d.platform for d in mesh.devices.flat} == {"cpu" if DRY else "gpu"}


def test_hlo_checks_catch_weight_gathers(rng):
    """Both readers flag the all-gather XLA inserts for the custom call without our rule."""
    with on_one():
        op = sc.make_operands(rng, "wmma-enk-bf16", 2)
    mesh = make_mesh(SHAPES["8"])
    f = jax.jit(lambda x, ids, w, s: sc.moe_matmul_p.bind(
        x, ids, w, s, kind=1, wtype=30, layout=0, reduce=True, out_dtype=np.dtype("bfloat16")))
    text = compiled_text(f.lower(op.x, op.ids, sc.put(op.w, mesh, P("a")), op.scores))
    assert sc.weight_moves(text, {2})
    assert weight_shaped_collectives(text, [op.w], N_DEV)


def _jit_cases():
    for p in sc.rule_cases():
        cpu_mesh = p.values[0]
        yield pytest.param(*p.values, id=f"{shape_name(SHAPES[cpu_mesh])}~{p.id}")


@pytest.mark.parametrize("cpu_mesh,rule,wname,reduce", list(_jit_cases()))
def test_jit_rule(rng, cpu_mesh, rule, wname, reduce):
    """tests/sharding_cases.py::test_jit_rule on this machine's mesh."""
    quantized = sc.WEIGHTS[wname][2] is not None
    x_rank = 3 if reduce == quantized else 2
    mesh = make_mesh(SHAPES[cpu_mesh])
    rule = sc.resolve(rule, mesh)
    with on_one():
        op = sc.make_operands(rng, wname, x_rank)
        one = functools.partial(moe_matmul, reduce=reduce, weight_layout=op.layout)
        ref = one(op.x, op.ids, op.w, op.scores)
        ts = size(mesh, rule.get("t"))
        per_shard = None
        if ts > 1:  # one device on each token shard: the kernel it picks depends on T
            c = sc.T // ts
            per_shard = jnp.concatenate([one(op.x[i:i + c], op.ids[i:i + c], op.w, op.scores[i:i + c])
                                         for i in range(0, sc.T, c)])
    xs, ws, tspec = sc.specs_for(rule, op, x_rank)
    args = (sc.put(op.x, mesh, xs), sc.put(op.ids, mesh, tspec), sc.put(op.w, mesh, ws),
            sc.put(op.scores, mesh, tspec))
    f = jax.jit(one)
    out = f(*args)
    j_split = "j" in rule and sc.k % mesh.shape[rule["j"]] == 0
    sums = "c" in rule or (reduce and ("e" in rule or j_split))
    assert out.dtype == ref.dtype
    if sums or per_shard is None:
        sc.assert_matches(out, ref, exact=not sums, out_dtype=op.out_dtype)
    else:  # bitwise equal to one device on the whole batch, or on each token shard
        try:
            sc.assert_matches(out, ref, exact=True, out_dtype=op.out_dtype)
        except AssertionError:
            sc.assert_matches(out, per_shard, exact=True, out_dtype=op.out_dtype)
    text = compiled_text(f.lower(*args))
    assert "jax_moe_matmul" in text
    assert_no_weight_moves(text, {2}, [op.w])
    if size(mesh, rule.get("e")) > 1 and "t" not in rule:  # each device computes its own pairs
        assert combinations(text) >= 1


@pytest.mark.parametrize("cpu_mesh", list(sc.MESHES))
@pytest.mark.parametrize("wname", ["wmma-enk-bf16", "scalar_gguf-q4_k"])
def test_shard_map_local_experts(rng, cpu_mesh, wname):
    """Expert parallelism by hand in shard_map (check_vma=True): local ids, one psum."""
    shape = SHAPES[cpu_mesh]
    mesh = make_mesh(shape, explicit=True)
    data, expert = (None, "a") if len(shape) == 1 else ("a", "b")
    with on_one():
        op = sc.make_operands(rng, wname, 2)
        ref = moe_matmul(op.x, op.ids, op.w, op.scores, out_dtype=jnp.float32)

    def body(x, ids, w, scores):
        if isinstance(w, QuantizedExperts):
            w = QuantizedExperts(w.data, w.qtype, (w.data.shape[0], w.N, w.K))
        e_local = w.shape[0]
        local = local_expert_ids(ids, expert, e_local)
        return jax.lax.psum(moe_matmul(x, local, w, scores, out_dtype=jnp.float32), expert)

    tok = P(data)
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, P(expert), tok), out_specs=tok,
                              check_vma=True))
    args = (sc.put(op.x, mesh, tok), sc.put(op.ids, mesh, tok), sc.put(op.w, mesh, P(expert)),
            sc.put(op.scores, mesh, tok))
    sc.assert_matches(f(*args), ref, exact=False, out_dtype="float32")
    assert_no_weight_moves(compiled_text(f.lower(*args)), {2}, [op.w])


@pytest.mark.parametrize("cpu_mesh", list(sc.MESHES))
def test_moe_ffn_under_jit_with_sharded_experts(rng, cpu_mesh):
    """Plain moe_ffn under jit: experts split along E, tokens along the other axis."""
    mesh = make_mesh(SHAPES[cpu_mesh])
    expert = mesh.axis_names[-1]
    data = mesh.axis_names[0] if len(mesh.axis_names) > 1 else None
    with on_one():
        x, ids, scores = sc.tokens(rng)
        gu, dn = sc.ffn_weights(rng, None)
        ref = moe_ffn(x, ids, scores, gu, dn)
    f = jax.jit(lambda *a: moe_ffn(*a))
    args = (sc.put(x, mesh, P(data)), sc.put(ids, mesh, P(data)), sc.put(scores, mesh, P(data)),
            sc.put(gu, mesh, P(expert)), sc.put(dn, mesh, P(expert)))
    sc.assert_matches(f(*args), ref, exact=False, out_dtype="bfloat16")
    assert_no_weight_moves(compiled_text(f.lower(*args)), {3, 4}, [gu, dn])


def _parallel_cases():
    for p in sc.parallel_cases():
        yield pytest.param(*p.values, id=f"{shape_name(SHAPES[p.values[0]])}~{p.id}")


@pytest.mark.parametrize("cpu_mesh,fmt,over", list(_parallel_cases()))
def test_parallel_ffn(rng, cpu_mesh, fmt, over):
    """ExpertParallel.ffn: data axis x expert axis, one combination per FFN, no weight moves."""
    shape = SHAPES[cpu_mesh]
    axes = ("expert",) if len(shape) == 1 else ("data", "expert")
    mesh = make_mesh(shape, axes)
    ep = ExpertParallel(mesh, data_axis=None if len(shape) == 1 else "data", tokens_over_experts=over)
    with on_one():
        x, ids, scores = sc.tokens(rng, lead=(8, 3))
        gu, dn = sc.ffn_weights(rng, fmt)
        if fmt is not None:
            gu, dn = (QuantizedExperts(jnp.asarray(w.data), w.qtype, w.shape) for w in (gu, dn))
        ref = moe_ffn(x, ids, scores, gu, dn)
    args = (ep.shard_tokens(x), ep.shard_tokens(ids), ep.shard_tokens(scores),
            ep.shard_experts(gu), ep.shard_experts(dn))
    f = jax.jit(lambda *a: ep.ffn(*a))
    out = f(*args)
    assert out.shape == x.shape and out.dtype == x.dtype
    sc.assert_matches(out, ref, exact=False, out_dtype="bfloat16")
    text = compiled_text(f.lower(*args))
    assert_no_weight_moves(text, {3, 4}, [gu, dn])
    assert combinations(text) == 1, combinations(text)


@pytest.mark.parametrize("cpu_mesh", ["2x4", "4x2"])
def test_parallel_block_with_shared_expert(rng, cpu_mesh):
    """ExpertParallel.block: router + experts + gated shared expert, equal to MoEWeights(x)."""
    mesh = make_mesh(SHAPES[cpu_mesh], ("data", "expert"))
    ep = ExpertParallel(mesh)
    D, Fs = sc.D, sc.Fs
    with on_one():
        gu, dn = sc.ffn_weights(rng, None, layout="ekn")
        w = MoEWeights(
            router=jnp.asarray(rng.standard_normal((D, sc.E)), jnp.float32), down=dn, gate_up=gu,
            shared_gate_up=jnp.asarray(rng.standard_normal((1, D, 2 * Fs)) / 8, jnp.bfloat16),
            shared_down=jnp.asarray(rng.standard_normal((1, Fs, D)) / 6, jnp.bfloat16),
            shared_expert_gate=jnp.asarray(rng.standard_normal(D), jnp.float32),
            config=RouterConfig(k=2), weight_layout="ekn")
        x = jnp.asarray(rng.standard_normal((16, 2, D)), jnp.bfloat16)
        ref, (ref_ids, _) = w(x, return_routing=True)
    sw = ep.shard_weights(w)
    f = jax.jit(lambda x, w: ep.block(x, w, return_routing=True))
    out, (ids, _) = f(x, sw)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_ids))
    sc.assert_matches(out, ref, exact=False, out_dtype="bfloat16")
    shaped = weight_shaped_collectives(compiled_text(f.lower(x, sw)), [gu, dn], N_DEV)
    assert not shaped, shaped
