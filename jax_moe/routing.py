"""Top-k expert routing: the conventions real MoE models use.

A router turns router logits ``[..., E]`` (one row per token, E experts) into the pair that
:func:`jax_moe.moe_matmul` and :func:`jax_moe.ffn.moe_ffn` take: ``expert_ids int32 [..., k]``
and ``scores float32 [..., k]``. Everything is computed in float32 whatever the logits' dtype.

The steps, in order (llama.cpp's ``build_moe_ffn`` and the Hugging Face reference models):

1. gating: ``probs = softmax(logits)`` (``"softmax"``), ``sigmoid(logits)`` (``"sigmoid"``), or
   the raw logits (``"topk_softmax"``: top-k first, softmax over the k afterwards);
2. ``selection = probs + bias`` when a selection-only ``bias [E]`` is given (DeepSeek-V3's
   ``e_score_correction_bias``, GGUF ``exp_probs_b``); the bias never enters the scores;
3. group-limited selection when ``n_groups > 1``: experts are split into ``n_groups`` equal
   groups, a group's score is the sum of its ``group_topk`` best selection values, and only
   the ``n_groups_used`` best groups stay eligible;
4. the k experts with the largest selection values (ties, -0.0 and +0.0 included: the lower
   expert id first); with groups, only experts of the kept groups, even where their values are
   -inf;
5. ``scores = probs[ids]``; softmax over the k for ``"topk_softmax"``;
6. ``normalize``: scores divided by their sum over the k;
7. ``scale``: scores multiplied by the routed scaling factor.

NaN is never hidden: a token whose logits hold a NaN, or any token when the bias holds one, gets
NaN scores (its ids stay in ``[0, E)``), so the NaN reaches the layer's output.

=================  ============  ==========  ===========  ========================
model              gating        normalize   bias/groups  scale
=================  ============  ==========  ===========  ========================
Mixtral            softmax       yes         no           1
Qwen2-MoE, OLMoE   softmax       no          no           1
Qwen3-MoE          softmax       yes         no           1
gpt-oss            topk_softmax  (no)        no           1
DeepSeek-V3        sigmoid       yes         bias, 8/4    2.5
Kimi-K2            sigmoid       yes         bias, 1/1    2.827
=================  ============  ==========  ===========  ========================

:class:`RouterConfig` has a constructor for each (``RouterConfig.mixtral()`` ...).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["GATINGS", "RouterConfig", "route"]

Gating = Literal["softmax", "sigmoid", "topk_softmax"]
GATINGS: tuple[str, ...] = ("softmax", "sigmoid", "topk_softmax")

# Smallest divisor used when renormalizing (the scores' sum is > 0 for every gating, this only
# guards against underflow; llama.cpp clamps the sum the same way).
_MIN_SUM = 6.103515625e-5


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """How to pick the k experts of a token and weigh them (hashable: usable as a static arg).

    Attributes:
      k: experts per token.
      gating: ``"softmax"``, ``"sigmoid"`` or ``"topk_softmax"`` (see the module docstring).
      normalize: divide the k scores by their sum.
      scale: routed scaling factor multiplied into the scores.
      n_groups: expert groups for group-limited selection (1 = off). Must divide E.
      n_groups_used: groups kept per token (default: all groups).
      group_topk: a group's score is the sum of its ``group_topk`` best selection values
        (2 in DeepSeek-V3 and llama.cpp; 1 gives DeepSeek-V2's max-per-group rule).
    """

    k: int
    gating: Gating = "softmax"
    normalize: bool = False
    scale: float = 1.0
    n_groups: int = 1
    n_groups_used: int | None = None
    group_topk: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise ValueError(f"RouterConfig: k must be a positive int, got {self.k!r}")
        if self.gating not in GATINGS:
            raise ValueError(f"RouterConfig: gating must be one of {GATINGS}, got {self.gating!r}")
        if not isinstance(self.n_groups, (int, np.integer)) or self.n_groups < 1:
            raise ValueError(f"RouterConfig: n_groups must be an int >= 1, got {self.n_groups!r}")
        used = self.n_groups if self.n_groups_used is None else self.n_groups_used
        if not isinstance(used, (int, np.integer)) or not 1 <= used <= self.n_groups:
            raise ValueError(
                f"RouterConfig: n_groups_used must be an int in [1, n_groups={self.n_groups}], "
                f"got {self.n_groups_used!r}")
        if not isinstance(self.group_topk, (int, np.integer)) or self.group_topk < 1:
            raise ValueError(f"RouterConfig: group_topk must be an int >= 1, got {self.group_topk!r}")
        try:
            scale = float(self.scale)
        except (TypeError, ValueError):
            raise TypeError(f"RouterConfig: scale must be a float, got {self.scale!r}") from None
        if not np.isfinite(scale):
            raise ValueError(f"RouterConfig: scale must be finite, got {self.scale!r}")
        object.__setattr__(self, "k", int(self.k))
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "n_groups", int(self.n_groups))
        object.__setattr__(self, "n_groups_used", int(used))
        object.__setattr__(self, "group_topk", int(self.group_topk))
        object.__setattr__(self, "normalize", bool(self.normalize))

    def __call__(self, logits: jax.Array, bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Route ``logits [..., E]``; returns ``(expert_ids int32 [..., k], scores f32 [..., k])``."""
        return route(logits, self.k, gating=self.gating, normalize=self.normalize, scale=self.scale,
                     bias=bias, n_groups=self.n_groups, n_groups_used=self.n_groups_used,
                     group_topk=self.group_topk)

    # -- the conventions of well-known models --------------------------------------------------
    @classmethod
    def mixtral(cls, k: int = 2) -> RouterConfig:
        """Mixtral: softmax over all experts, top-k, renormalized over the k."""
        return cls(k=k, gating="softmax", normalize=True)

    @classmethod
    def qwen2_moe(cls, k: int = 4) -> RouterConfig:
        """Qwen2-MoE (Qwen1.5-MoE): softmax, top-k, not renormalized."""
        return cls(k=k, gating="softmax", normalize=False)

    @classmethod
    def qwen3_moe(cls, k: int = 8) -> RouterConfig:
        """Qwen3-MoE: softmax, top-k, renormalized (``norm_topk_prob=True``)."""
        return cls(k=k, gating="softmax", normalize=True)

    @classmethod
    def olmoe(cls, k: int = 8) -> RouterConfig:
        """OLMoE: softmax, top-k, not renormalized."""
        return cls(k=k, gating="softmax", normalize=False)

    @classmethod
    def gpt_oss(cls, k: int = 4) -> RouterConfig:
        """gpt-oss: top-k of the logits, then softmax over the k."""
        return cls(k=k, gating="topk_softmax")

    @classmethod
    def deepseek_v3(cls, k: int = 8, n_groups: int = 8, n_groups_used: int = 4,
                    scale: float = 2.5) -> RouterConfig:
        """DeepSeek-V3: sigmoid, selection bias, group-limited top-k, renormalized, scaled.

        Pass the model's ``e_score_correction_bias`` as ``bias`` when routing.
        """
        return cls(k=k, gating="sigmoid", normalize=True, scale=scale, n_groups=n_groups,
                   n_groups_used=n_groups_used)

    @classmethod
    def kimi_k2(cls, k: int = 8, scale: float = 2.827) -> RouterConfig:
        """Kimi-K2: DeepSeek-V3's router with a single group and scaling factor 2.827."""
        return cls(k=k, gating="sigmoid", normalize=True, scale=scale, n_groups=1, n_groups_used=1)


def route(
    logits: jax.Array,
    k: int | RouterConfig,
    *,
    gating: Gating = "softmax",
    normalize: bool = False,
    scale: float = 1.0,
    bias: jax.Array | None = None,
    n_groups: int = 1,
    n_groups_used: int | None = None,
    group_topk: int = 2,
) -> tuple[jax.Array, jax.Array]:
    """Select k experts per token and their routing weights.

    Args:
      logits: ``[..., E]`` router logits, any float dtype (computed in float32).
      k: experts per token, ``1 <= k <= E`` (and at most the experts of the kept groups); or a
        whole :class:`RouterConfig` (``route(logits, RouterConfig.qwen3_moe(k=8))``), which then
        sets every option below but ``bias``.
      gating: ``"softmax"``, ``"sigmoid"`` or ``"topk_softmax"`` (top-k, then softmax over the k).
      normalize: divide the k scores by their sum.
      scale: multiply the scores by this routed scaling factor.
      bias: optional ``[E]`` selection-only bias added to the gated probabilities (or, for
        ``"topk_softmax"``, to the logits) before selection; it does not enter the scores.
      n_groups: split the E experts into this many equal groups for group-limited selection.
      n_groups_used: keep the best ``n_groups_used`` groups per token (default: all).
      group_topk: a group's score is the sum of its ``group_topk`` best selection values.

    Returns:
      ``(expert_ids, scores)``: ``int32 [..., k]`` and ``float32 [..., k]``, experts in
      decreasing order of selection value.
    """
    if isinstance(k, RouterConfig):
        given = dict(gating=gating, normalize=normalize, scale=scale, n_groups=n_groups,
                     n_groups_used=n_groups_used, group_topk=group_topk)
        defaults = dict(gating="softmax", normalize=False, scale=1.0, n_groups=1,
                        n_groups_used=None, group_topk=2)
        clash = sorted(n for n, v in given.items() if v != defaults[n])
        if clash:
            raise TypeError(f"route: pass either a RouterConfig or {', '.join(clash)}, not both "
                            f"(use dataclasses.replace(config, ...) to change a RouterConfig)")
        return k(logits, bias)
    cfg = RouterConfig(k=k, gating=gating, normalize=normalize, scale=scale, n_groups=n_groups,
                       n_groups_used=n_groups_used, group_topk=group_topk)
    logits = jnp.asarray(logits)
    if logits.ndim < 1:
        raise ValueError(f"route: logits must have shape [..., E], got a scalar")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"route: logits must be a float array [..., E], got dtype {logits.dtype}")
    num_experts = logits.shape[-1]
    if cfg.k > num_experts:
        raise ValueError(f"route: k={cfg.k} is larger than the number of experts E={num_experts}")
    logits = logits.astype(jnp.float32)

    if cfg.gating == "softmax":
        probs = jax.nn.softmax(logits, axis=-1)
    elif cfg.gating == "sigmoid":
        probs = jax.nn.sigmoid(logits)
    else:  # topk_softmax
        probs = logits

    selection = probs
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.shape != (num_experts,):
            raise ValueError(f"route: bias must have shape [E]=({num_experts},), got {bias.shape}")
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise TypeError(f"route: bias must be a float array [E], got dtype {bias.dtype}")
        selection = probs + bias.astype(jnp.float32)

    key = _order_key(selection)
    if cfg.n_groups > 1:
        if num_experts % cfg.n_groups:
            raise ValueError(f"route: n_groups={cfg.n_groups} must divide the number of experts "
                             f"E={num_experts}")
        per_group = num_experts // cfg.n_groups
        if cfg.group_topk > per_group:
            raise ValueError(f"route: group_topk={cfg.group_topk} is larger than the "
                             f"{per_group} experts of a group")
        if cfg.k > cfg.n_groups_used * per_group:
            raise ValueError(f"route: k={cfg.k} is larger than the {cfg.n_groups_used * per_group} "
                             f"experts of the n_groups_used={cfg.n_groups_used} kept groups")
        groups = selection.reshape(*selection.shape[:-1], cfg.n_groups, per_group)
        group_scores = jax.lax.top_k(groups, cfg.group_topk)[0].sum(axis=-1)  # [..., G]
        _, kept = jax.lax.top_k(_order_key(group_scores), cfg.n_groups_used)  # [..., n_groups_used]
        keep = jnp.any(kept[..., :, None] == jnp.arange(cfg.n_groups), axis=-2)  # [..., G]
        # Experts of the other groups rank below every value, -inf and NaN included.
        key = jnp.where(keep[..., None], key.reshape(groups.shape), _DROPPED).reshape(key.shape)

    _, expert_ids = jax.lax.top_k(key, cfg.k)
    scores = jnp.take_along_axis(probs, expert_ids, axis=-1)
    if cfg.gating == "topk_softmax":
        scores = jax.nn.softmax(scores, axis=-1)
    if cfg.normalize:
        scores = scores / jnp.maximum(scores.sum(axis=-1, keepdims=True), _MIN_SUM)
    if cfg.scale != 1.0:
        scores = scores * jnp.float32(cfg.scale)
    # NaN is never hidden: a token with a NaN selection value (a NaN logit, or a NaN bias) gets
    # NaN scores, whichever experts it picked.
    scores = jnp.where(jnp.isnan(selection).any(axis=-1, keepdims=True), jnp.float32(jnp.nan), scores)
    return expert_ids.astype(jnp.int32), scores.astype(jnp.float32)


# int32 keys of _order_key: every number maps above _NAN, which is above _DROPPED.
_DROPPED = np.int32(np.iinfo(np.int32).min)
_NAN = np.int32(np.iinfo(np.int32).min + 1)


def _order_key(v: jax.Array) -> jax.Array:
    """int32 keys that order float32 values ``v`` as selection means them, for ``lax.top_k``
    (which breaks ties by the lower index): numbers in their order with -0.0 equal to +0.0 (a
    float top_k puts -0.0 below +0.0, breaking the lower-id rule), -inf above NaN, NaN above
    nothing but the experts of dropped groups."""
    v = jnp.where(v == 0, jnp.float32(0), v)
    bits = jax.lax.bitcast_convert_type(v, jnp.int32)
    key = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)  # sign-magnitude -> two's complement order
    return jnp.where(jnp.isnan(v), _NAN, key)
