"""A scan-over-layers model (the common JAX LLM layout) whose layers hold quantized experts.

    python examples/scan_layers.py [--layers 4] [--qtype Q4_K_M]

The L MoE blocks are created stacked with ``nnx.vmap`` (every variable gets a leading layer
axis), quantized in place with ``MoE.quantize`` (the GGUF blocks keep the layer axis:
``[L, E, N, Kb]``), and run with ``nnx.scan`` over the layer axis under ``nnx.jit``; each step
sees one layer's ``[E, N, Kb]`` experts. The same stack then runs with ``jax.lax.scan`` over
its ``MoEWeights`` (``QuantizedExperts`` with a leading layer axis), and both are checked
against a Python loop over the layers (``q[i]``), whose every layer is checked against a float64
NumPy reference computed from the decoded weights, that layer's input and the routing it chose
(itself checked against Mixtral's top-k softmax in float64).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_moe
import jax_moe.nnx
from jax_moe import RouterConfig


def make_stack(layers: int, d_model: int, d_expert: int, experts: int, k: int, seed: int):
    """``layers`` MoE blocks stacked along a leading axis (nnx.vmap over their construction)."""

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> jax_moe.nnx.MoE:
        return jax_moe.nnx.MoE(d_model, d_expert, experts, router=RouterConfig.mixtral(k=k),
                               rngs=rngs)

    return create(nnx.Rngs(seed))


@nnx.jit
def forward(stack: jax_moe.nnx.MoE, x: jax.Array) -> jax.Array:
    """x [T, D] through every layer: ``x <- x + moe_l(x)``, one nnx.scan step per layer."""

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def layer(moe: jax_moe.nnx.MoE, x: jax.Array) -> jax.Array:
        return x + moe(x)

    return layer(stack, x)


def reference_layer(weights: jax_moe.MoEWeights, layer: int, x: np.ndarray, ids: np.ndarray,
                    scores: np.ndarray) -> np.ndarray:
    """float64 NumPy of one layer, ``x + moe(x)``, on that layer's input x [T, D] with the routing
    it chose (ids, scores [T, k]), and the layer's bfloat16 roundings (hidden state, output)
    applied as the kernels apply them. Taking the layer's own routing keeps a near-tie between
    two experts' router probabilities (float32 in the model, float64 here) from flipping an
    expert; ``check_routing`` checks that routing against float64 separately."""
    import ml_dtypes

    def bf16(a):
        return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)

    gate_up = np.asarray(jax_moe.dequantize(weights.gate_up[layer]), np.float64)  # [E, 2F, D]
    down = np.asarray(jax_moe.dequantize(weights.down[layer]), np.float64)        # [E, D, F]
    f = down.shape[-1]
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            h = bf16(gate_up[ids[t, j]] @ x[t])
            a = bf16(h[:f] / (1 + np.exp(-h[:f])) * h[f:])
            y[t] += scores[t, j] * (down[ids[t, j]] @ a)
    return bf16(x + bf16(y))


def check_routing(router: np.ndarray, x: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> bool:
    """Mixtral's routing of x [T, D] in float64: the chosen ids are the top k of softmax(x @ router)
    (up to a near-tie, where float32 and float64 may order two experts differently) and the
    scores are their probabilities renormalized over the k."""
    logits = x @ router
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    chosen = np.take_along_axis(p, ids, -1)
    chosen_mask = np.zeros(p.shape, bool)
    np.put_along_axis(chosen_mask, ids, True, -1)
    others = np.where(chosen_mask, -np.inf, p)  # each token's unchosen experts
    top_k = (chosen.min(-1) >= others.max(-1) - 1e-5).all()
    return bool(top_k and np.allclose(scores, chosen / chosen.sum(-1, keepdims=True), atol=1e-5))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--qtype", default="Q4_K_M")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    L, D, F, E, k = args.layers, 256, 256, 8, 2

    stack = make_stack(L, D, F, E, k, args.seed)
    assert stack.gate_up[...].shape == (L, E, D, 2 * F)  # [L, E, D_in, D_out], Flax's layout
    stack.quantize(args.qtype)                            # in place, every layer at once
    q = stack.gate_up.experts()
    print(f"{L} stacked layers, gate_up {q} data {list(q.data.shape)}, down {stack.down.experts()}")

    x = jax.random.normal(jax.random.key(args.seed + 1), (args.tokens, D), jnp.bfloat16)
    y_nnx = forward(stack, x)

    # the same stack as framework-free weights, through jax.lax.scan
    weights = stack.weights()  # router [L, D, E], QuantizedExperts [L, E, N, Kb]
    y_scan, _ = jax.jit(lambda w, x: jax.lax.scan(lambda x, wl: (x + wl(x), None), x, w))(weights, x)
    # and one layer at a time, slicing the stack by hand; each layer against float64 NumPy on
    # that layer's input, with the routing it chose
    y_loop, err, routed = x, 0.0, True
    for i in range(L):
        layer = jax_moe.MoEWeights(router=weights.router[i], gate_up=weights.gate_up[i],
                                   down=weights.down[i], config=weights.config)
        out, (ids, scores) = jax.jit(lambda w, x: w(x, return_routing=True))(layer, y_loop)
        x64, ids, scores = np.asarray(y_loop, np.float64), np.asarray(ids), np.asarray(scores, np.float64)
        routed &= check_routing(np.asarray(weights.router[i], np.float64), x64, ids, scores)
        y_loop = y_loop + out
        ref = reference_layer(weights, i, x64, ids, scores)
        err = max(err, float(np.abs(np.asarray(y_loop, np.float64) - ref).max() / np.abs(ref).max()))

    same = (np.array_equal(np.asarray(y_nnx, np.float32), np.asarray(y_scan, np.float32))
            and np.array_equal(np.asarray(y_nnx, np.float32), np.asarray(y_loop, np.float32)))
    print(f"nnx.scan, jax.lax.scan and a Python loop over the layers agree bit for bit: {same}")
    print(f"every layer routes as Mixtral's top-{k} softmax in float64: {routed}")
    print(f"{tuple(x.shape)} -> {tuple(y_nnx.shape)} {y_nnx.dtype}, max error of a layer vs float64 {err:.2e}")
    ok = same and routed and err < 2.0**-5  # one layer's bf16 roundings; a wrong expert: 10x
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
