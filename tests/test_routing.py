"""jax_moe.routing against a plain NumPy float64 implementation of each model's convention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_moe.routing import RouterConfig, route

# f32 routing vs the float64 reference: a few dozen float32 ulps through softmax/sigmoid,
# the sum over the k and the scaling.
RTOL, ATOL = 1e-5, 1e-6
# The reference redraws inputs until its choice is unambiguous by this margin, so that the f32
# implementation cannot legitimately pick a different expert or group.
MARGIN = 1e-4


def ref_route(logits, cfg: RouterConfig, bias=None):
    """Plain NumPy float64, one token at a time. Returns (ids, scores, smallest decision margin)."""
    logits = np.asarray(logits, np.float64)
    lead, num_experts = logits.shape[:-1], logits.shape[-1]
    rows = logits.reshape(-1, num_experts)
    ids = np.zeros((rows.shape[0], cfg.k), np.int64)
    scores = np.zeros((rows.shape[0], cfg.k), np.float64)
    margin = np.inf
    for t, row in enumerate(rows):
        if cfg.gating == "softmax":
            e = np.exp(row - row.max())
            probs = e / e.sum()
        elif cfg.gating == "sigmoid":
            probs = 1.0 / (1.0 + np.exp(-row))
        else:
            probs = row.copy()
        sel = probs + (0.0 if bias is None else np.asarray(bias, np.float64))
        eligible = list(range(num_experts))
        if cfg.n_groups > 1:
            per = num_experts // cfg.n_groups
            gscore = [np.sort(sel[g * per:(g + 1) * per])[::-1][:cfg.group_topk].sum()
                      for g in range(cfg.n_groups)]
            order = sorted(range(cfg.n_groups), key=lambda g: -gscore[g])
            if cfg.n_groups_used < cfg.n_groups:
                margin = min(margin, gscore[order[cfg.n_groups_used - 1]] - gscore[order[cfg.n_groups_used]])
            kept = order[:cfg.n_groups_used]
            eligible = [e for e in range(num_experts) if e // per in kept]
        ranked = sorted(eligible, key=lambda e: -sel[e])
        if cfg.k < len(ranked):
            margin = min(margin, sel[ranked[cfg.k - 1]] - sel[ranked[cfg.k]])
        chosen = ranked[:cfg.k]
        w = probs[chosen]
        if cfg.gating == "topk_softmax":
            w = np.exp(w - w.max())
            w = w / w.sum()
        if cfg.normalize:
            w = w / w.sum()
        w = w * cfg.scale
        ids[t], scores[t] = chosen, w
    return ids.reshape(*lead, cfg.k), scores.reshape(*lead, cfg.k), margin


def draw(rng, shape, cfg, with_bias=False, std=2.0):
    """Fresh random logits (and bias) for which the reference's choice is unambiguous."""
    for _ in range(100):
        logits = (rng.standard_normal(shape) * std).astype(np.float32)
        bias = (rng.standard_normal(shape[-1]) * 0.1).astype(np.float32) if with_bias else None
        ids, scores, margin = ref_route(logits, cfg, bias)
        if margin > MARGIN:
            return logits, bias, ids, scores
    raise AssertionError("could not draw unambiguous routing inputs")


def check(cfg, logits, bias, ref_ids, ref_scores):
    ids, scores = cfg(jnp.asarray(logits), None if bias is None else jnp.asarray(bias))
    assert ids.dtype == jnp.int32 and scores.dtype == jnp.float32
    assert ids.shape == ref_ids.shape and scores.shape == ref_scores.shape
    np.testing.assert_array_equal(np.asarray(ids), ref_ids)
    np.testing.assert_allclose(np.asarray(scores, np.float64), ref_scores, rtol=RTOL, atol=ATOL)



@pytest.mark.parametrize("name,cfg", [
    ("mixtral", RouterConfig.mixtral(k=2)),
    ("qwen2_moe", RouterConfig.qwen2_moe(k=4)),
    ("qwen3_moe", RouterConfig.qwen3_moe(k=8)),
    ("olmoe", RouterConfig.olmoe(k=8)),
    ("gpt_oss", RouterConfig.gpt_oss(k=4)),
])
def test_softmax_family(rng, name, cfg):
    logits, _, ids, scores = draw(rng, (37, 64), cfg)
    check(cfg, logits, None, ids, scores)
    if cfg.normalize or cfg.gating == "topk_softmax":
        np.testing.assert_allclose(scores.sum(-1), 1.0, rtol=1e-12)


def test_softmax_presets_are_the_model_conventions():
    assert RouterConfig.mixtral() == RouterConfig(k=2, gating="softmax", normalize=True)
    assert RouterConfig.qwen2_moe(4) == RouterConfig(k=4, gating="softmax", normalize=False)
    assert RouterConfig.qwen3_moe() == RouterConfig(k=8, gating="softmax", normalize=True)
    assert RouterConfig.olmoe() == RouterConfig(k=8, gating="softmax", normalize=False)
    assert RouterConfig.gpt_oss() == RouterConfig(k=4, gating="topk_softmax")


def test_mixtral_equals_topk_then_softmax(rng):
    """Mixtral's renormalized softmax is the softmax over the top-k logits."""
    cfg = RouterConfig.mixtral(k=2)
    logits, _, ref_ids, ref_scores = draw(rng, (19, 8), cfg)
    ids, scores = route(jnp.asarray(logits), 2, gating="topk_softmax")
    np.testing.assert_array_equal(np.asarray(ids), ref_ids)
    np.testing.assert_allclose(np.asarray(scores, np.float64), ref_scores, rtol=RTOL, atol=ATOL)


def test_deepseek_v3_sigmoid_bias_groups_scale(rng):
    cfg = RouterConfig.deepseek_v3(k=8, n_groups=8, n_groups_used=4, scale=2.5)
    logits, bias, ids, scores = draw(rng, (29, 64), cfg, with_bias=True)
    check(cfg, logits, bias, ids, scores)
    # the selection bias chooses, but the scores are the unbiased sigmoid (renormalized, scaled)
    np.testing.assert_allclose(scores.sum(-1), 2.5, rtol=1e-12)
    per = 64 // 8
    assert all(len({e // per for e in row}) <= 4 for row in ids)


def test_kimi_k2(rng):
    cfg = RouterConfig.kimi_k2(k=8)
    logits, bias, ids, scores = draw(rng, (23, 48), cfg, with_bias=True)
    check(cfg, logits, bias, ids, scores)
    np.testing.assert_allclose(scores.sum(-1), 2.827, rtol=1e-12)


def test_bias_changes_selection_not_scores(rng):
    """A large bias on one expert forces it in; its score is still its own sigmoid."""
    cfg = RouterConfig(k=2, gating="sigmoid")
    logits = (rng.standard_normal((11, 16)) * 2).astype(np.float32)
    bias = np.zeros(16, np.float32)
    bias[5] = 10.0
    ids, scores = cfg(jnp.asarray(logits), jnp.asarray(bias))
    ids, scores = np.asarray(ids), np.asarray(scores)
    assert (ids[:, 0] == 5).all()
    np.testing.assert_allclose(scores[:, 0], 1 / (1 + np.exp(-logits[:, 5].astype(np.float64))),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("group_topk", [1, 2, 3])
def test_group_limited_softmax(rng, group_topk):
    """DeepSeek-V2 style (softmax, max per group) and other group scores."""
    cfg = RouterConfig(k=6, gating="softmax", n_groups=4, n_groups_used=2, group_topk=group_topk)
    logits, _, ids, scores = draw(rng, (31, 32), cfg)
    check(cfg, logits, None, ids, scores)


def test_leading_dims_bf16_and_jit(rng):
    cfg = RouterConfig.deepseek_v3(k=4, n_groups=4, n_groups_used=2, scale=1.5)
    for _ in range(100):
        logits = jnp.asarray(rng.standard_normal((2, 5, 32)) * 2, jnp.bfloat16)
        bias = (rng.standard_normal(32) * 0.1).astype(np.float32)
        ids, scores, margin = ref_route(np.asarray(logits.astype(jnp.float32)), cfg, bias)
        if margin > MARGIN:
            break
    got_ids, got_scores = jax.jit(cfg.__call__)(logits, jnp.asarray(bias))
    assert got_ids.shape == (2, 5, 4) and got_scores.shape == (2, 5, 4)
    np.testing.assert_array_equal(np.asarray(got_ids), ids)
    np.testing.assert_allclose(np.asarray(got_scores, np.float64), scores, rtol=RTOL, atol=ATOL)


def test_bad_inputs():
    logits = jnp.ones((3, 8), jnp.float32)
    with pytest.raises(ValueError, match="k=9"):
        route(logits, 9)
    with pytest.raises(ValueError, match="gating"):
        route(logits, 2, gating="relu")
    with pytest.raises(ValueError, match="bias"):
        route(logits, 2, bias=jnp.zeros(7))
    with pytest.raises(ValueError, match="n_groups"):
        route(logits, 2, n_groups=3)
    with pytest.raises(ValueError, match="n_groups_used"):
        route(logits, 2, n_groups=2, n_groups_used=3)
    with pytest.raises(ValueError, match="k=5"):
        route(logits, 5, n_groups=4, n_groups_used=2)
    with pytest.raises(TypeError, match="logits"):
        route(jnp.ones((3, 8), jnp.int32), 2)
    with pytest.raises(ValueError, match="k must be"):
        RouterConfig(k=0)


@pytest.mark.parametrize("gating", ["softmax", "sigmoid", "topk_softmax"])
def test_nan_logits_make_that_tokens_scores_nan(rng, gating):
    """A NaN logit is never hidden (sigmoid used to drop its expert and keep finite scores):
    that token's scores are all NaN, its ids stay in [0, E), the other tokens are unchanged."""
    cfg = RouterConfig(k=4, gating=gating, normalize=gating != "topk_softmax")
    logits, _, ref_ids, ref_scores = draw(rng, (7, 16), cfg)
    bad = int(rng.integers(7))
    logits[bad, rng.integers(16)] = np.nan
    ids, scores = map(np.asarray, cfg(jnp.asarray(logits)))
    assert np.isnan(scores[bad]).all()
    assert ((ids >= 0) & (ids < 16)).all()
    rest = [t for t in range(7) if t != bad]
    np.testing.assert_array_equal(ids[rest], ref_ids[rest])
    np.testing.assert_allclose(scores[rest], ref_scores[rest], rtol=RTOL, atol=ATOL)


def test_nan_selection_bias_makes_every_score_nan(rng):
    """A NaN in the selection bias (which every token adds) used to force its expert in with
    finite scores; now every token's scores are NaN, with or without groups."""
    for cfg in (RouterConfig(k=2, gating="sigmoid", normalize=True),
                RouterConfig.deepseek_v3(k=4, n_groups=4, n_groups_used=2)):
        logits = rng.standard_normal((5, 16)).astype(np.float32)
        bias = (rng.standard_normal(16) * 0.1).astype(np.float32)
        bias[rng.integers(16)] = np.nan
        ids, scores = map(np.asarray, cfg(jnp.asarray(logits), jnp.asarray(bias)))
        assert np.isnan(scores).all()
        assert ((ids >= 0) & (ids < 16)).all()


@pytest.mark.parametrize("n_groups,used,group_topk", [(1, 1, 2), (4, 1, 1), (4, 1, 2), (8, 2, 2)])
def test_exact_ties_signed_zeros_and_infinities(rng, n_groups, used, group_topk):
    """Logits drawn from {-inf, -1, -0.0, +0.0, 1, 2} (exact in float32 and float64, so the
    reference's choice is exact): ties, -0.0 against +0.0 included, go to the lower expert id
    (and the lower group id), and only experts of kept groups are selected even where the kept
    experts' values are -inf."""
    E, k = 16, 3
    cfg = RouterConfig(k=k, gating="topk_softmax", n_groups=n_groups, n_groups_used=used,
                       group_topk=group_topk)
    values = np.array([-np.inf, -1.0, -0.0, 0.0, 1.0, 2.0], np.float32)
    logits = rng.choice(values, size=(600, E), p=[0.25, 0.2, 0.25, 0.25, 0.03, 0.02])
    ids, scores = map(np.asarray, cfg(jnp.asarray(logits)))
    with np.errstate(invalid="ignore"):  # softmax over k values that are all -inf: NaN, as ours
        ref_ids, ref_scores, _ = ref_route(logits, cfg)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=RTOL, atol=ATOL, equal_nan=True)
    if n_groups > 1:
        per = E // n_groups
        assert all(len({int(e) // per for e in row}) <= used for row in ids)


def test_group_limit_holds_when_the_kept_group_is_minus_inf():
    """The case of the issue: group 2 is kept (its best value is 5), its other expert is -inf;
    the second pick must be that expert, not expert 0 of a dropped group."""
    logits = np.full((1, 8), -np.inf, np.float32)
    logits[0, 4] = 5.0
    ids, _ = route(jnp.asarray(logits), 2, gating="topk_softmax", n_groups=4, n_groups_used=1, group_topk=1)
    np.testing.assert_array_equal(np.asarray(ids), [[4, 5]])
