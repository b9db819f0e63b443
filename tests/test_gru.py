"""rules.GRU: torch.nn.GRUCell as the memory's update, against PyTorch and kvfold.reference."""

import pickle

import numpy as np
import pytest
from numpy.testing import assert_allclose

import kvfold
from conftest import SHAPES, tokens
from kvfold import reference, rules


def weights(rng, D, heads=None, bias=True):
    lead = () if heads is None else (heads,)
    s = 1 / np.sqrt(D)
    w = dict(
        weight_ih=rng.uniform(-s, s, lead + (3 * D, D)).astype(np.float32),
        weight_hh=rng.uniform(-s, s, lead + (3 * D, D)).astype(np.float32),
    )
    if bias:
        w.update(
            bias_ih=rng.uniform(-s, s, lead + (3 * D,)).astype(np.float32),
            bias_hh=rng.uniform(-s, s, lead + (3 * D,)).astype(np.float32),
        )
    return w


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-head"])
@pytest.mark.parametrize("dk, dv", [(3, 5), (16, 16), (33, 7)])
def test_matches_torch_grucell(per_head, dk, dv, rng):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)  # tiny matrices: a thread pool only adds waiting
    B, H, T, D = 2, 3, 25, dk + dv
    cells = [torch.nn.GRUCell(D, D) for _ in range(H if per_head else 1)]
    params = [{n: p.detach().numpy() for n, p in c.named_parameters()} for c in cells]
    stacked = {n: np.stack([p[n] for p in params]) if per_head else params[0][n] for n in params[0]}
    cache = kvfold.MemoryCache(rules.GRU(**stacked), num_heads=H, head_dim=dk, value_dim=dv, batch_size=B)
    k, v = tokens(rng, B, H, T, dk), tokens(rng, B, H, T, dv)
    cache.update(k, v)
    x = torch.from_numpy(np.concatenate([k, v], axis=-1))  # (B, H, T, D)
    want = np.zeros((B, H, D), np.float32)
    with torch.no_grad():
        for h in range(H):
            state = torch.zeros(B, D)
            for t in range(T):
                state = cells[h if per_head else 0](x[:, h, t], state)
            want[:, h] = state.numpy()
    mk, mv = cache.memory()
    assert mk.shape == (B, H, 1, dk) and mv.shape == (B, H, 1, dv)
    assert_allclose(np.concatenate([mk[:, :, 0], mv[:, :, 0]], axis=-1), want, rtol=1e-5, atol=1e-6)


# (batch, KV heads, query heads, d_k, d_v, window, sinks)
SHAPES = SHAPES[:5]


@pytest.mark.parametrize("model", [reference.ReferenceCache, reference.StreamCache], ids=lambda c: c.__name__)
@pytest.mark.parametrize("per_head, bias", [(False, True), (True, True), (False, False)])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, per_head, bias, model, rng):
    B, H, Hq, dk, dv, window, sinks = shape
    rule = rules.GRU(**weights(rng, dk + dv, H if per_head else None, bias))
    kw = dict(num_heads=H, head_dim=dk, value_dim=dv, num_query_heads=Hq, batch_size=B, window=window, sinks=sinks)
    cache, ref = kvfold.MemoryCache(rule, **kw), model(rule, **kw)
    T = 15
    q, k, v = tokens(rng, B, Hq, T, dk), tokens(rng, B, H, T, dk), tokens(rng, B, H, T, dv)
    for t in range(8):
        assert_allclose(
            cache.step(q[:, :, t], k[:, :, t], v[:, :, t]),
            ref.step(q[:, :, t], k[:, :, t], v[:, :, t]),
            rtol=1e-5,
            atol=1e-6,
        )
    assert_allclose(
        cache.forward(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:]),
        ref.forward(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:]),
        rtol=1e-5,
        atol=1e-6,
    )
    for mine, theirs in zip(cache.memory(), ref.memory()):
        assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)


def test_forward_is_a_loop_of_step_and_state_round_trips(rng):
    rule = rules.GRU(**weights(rng, 9, heads=2))
    kw = dict(num_heads=2, head_dim=4, value_dim=5, num_query_heads=4, batch_size=2, window=3, sinks=1)
    a, b = kvfold.MemoryCache(rule, **kw), kvfold.MemoryCache(rule, **kw)
    q, k, v = tokens(rng, 2, 4, 12, 4), tokens(rng, 2, 2, 12, 4), tokens(rng, 2, 2, 12, 5)
    outs = np.stack([b.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(12)], axis=2)
    np.testing.assert_array_equal(a.forward(q, k, v), outs)
    assert a.to_bytes() == b.to_bytes()
    for other in (kvfold.MemoryCache.from_bytes(a.to_bytes()), pickle.loads(pickle.dumps(a)), a.copy()):
        assert other.rule == rule and other.to_bytes() == a.to_bytes()


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-head"])
def test_a_row_folds_as_it_does_alone(per_head, rng):
    """A decode step folds the lanes of every row in one matrix product; each row's results are
    exactly those of a cache of that row alone."""
    B, H, dk, dv = 3, 2, 5, 6
    rule = rules.GRU(**weights(rng, dk + dv, H if per_head else None))
    kw = dict(num_heads=H, head_dim=dk, value_dim=dv, window=2, sinks=1)
    batch = kvfold.MemoryCache(rule, batch_size=B, **kw)
    alone = [kvfold.MemoryCache(rule, **kw) for _ in range(B)]
    q, k, v = tokens(rng, B, H, 9, dk), tokens(rng, B, H, 9, dk), tokens(rng, B, H, 9, dv)
    for t in range(9):
        out = batch.step(q[:, :, t], k[:, :, t], v[:, :, t])
        for b, cache in enumerate(alone):
            np.testing.assert_array_equal(
                out[b : b + 1], cache.step(q[b : b + 1, :, t], k[b : b + 1, :, t], v[b : b + 1, :, t])
            )
    for b, cache in enumerate(alone):
        for mine, theirs in zip(batch.memory(), cache.memory()):
            np.testing.assert_array_equal(mine[b : b + 1], theirs)


def test_rule_value_semantics(rng):
    w = weights(rng, 4)
    a, b = rules.GRU(**w), rules.GRU(**{n: x.copy() for n, x in w.items()})
    assert a == b and hash(a) == hash(b)
    assert a != rules.GRU(w["weight_ih"], w["weight_hh"])
    assert repr(rules.GRU(w["weight_ih"], w["weight_hh"])) == (
        "GRU(weight_ih=<float32 (12, 4)>, weight_hh=<float32 (12, 4)>, bias_ih=None, bias_hh=None)"
    )
    assert not a.weight_ih.flags.writeable
    w64 = rules.GRU(w["weight_ih"].astype(np.float64), w["weight_hh"].tolist())
    assert w64.weight_ih.dtype == np.float32 and w64.weight_hh.dtype == np.float32


@pytest.mark.parametrize(
    "make, error, words",
    [
        (
            lambda w: rules.GRU(w["weight_ih"][:, :3], w["weight_hh"][:, :3]),
            ValueError,
            ["weight_ih", "(3*D, D)", "(12, 3)"],
        ),
        (lambda w: rules.GRU(w["weight_ih"], w["weight_hh"][:9]), ValueError, ["weight_hh", "(12, 4)", "(9, 4)"]),
        (
            lambda w: rules.GRU(w["weight_ih"], w["weight_hh"], bias_ih=w["bias_ih"][:5]),
            ValueError,
            ["bias_ih", "(12,)"],
        ),
        (
            lambda w: rules.GRU(w["weight_ih"], w["weight_hh"], bias_hh=np.zeros((2, 12))),
            ValueError,
            ["bias_hh", "(12,)"],
        ),
        (lambda w: rules.GRU(w["weight_ih"] * np.nan, w["weight_hh"]), ValueError, ["weight_ih", "finite"]),
        (
            lambda w: rules.GRU(w["weight_ih"].astype(np.float64) * 1e39, w["weight_hh"]),
            ValueError,
            ["weight_ih", "finite"],
        ),
        (lambda w: rules.GRU("weights", w["weight_hh"]), TypeError, ["weight_ih"]),
        (lambda w: rules.GRU(w["weight_ih"].astype(complex), w["weight_hh"]), TypeError, ["weight_ih", "complex"]),
        (lambda w: rules.GRU(w["weight_ih"], None), TypeError, ["weight_hh"]),
        (lambda w: rules.GRU([[0.0], [0.0, 1.0]], w["weight_hh"]), ValueError, ["weight_ih", "regular array"]),
    ],
)
def test_bad_weights(make, error, words, rng):
    with pytest.raises(error) as info:
        make(weights(rng, 4))
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_weights_must_fit_the_cache(rng):
    with pytest.raises(ValueError, match=r"weight_ih must be \(21, 7\) for head_dim=3 \+ value_dim=4, got \(12, 4\)"):
        kvfold.MemoryCache(rules.GRU(**weights(rng, 4)), num_heads=1, head_dim=3, value_dim=4)
    with pytest.raises(ValueError, match=r"one set per KV head \(H=2\)"):
        kvfold.MemoryCache(rules.GRU(**weights(rng, 4, heads=3)), num_heads=2, head_dim=2)
