"""The four ONNX rules against onnx.reference's LinearAttention (opset 27), and continuing an ONNX
Runtime state in kvfold and back."""

import numpy as np
import pytest
from numpy.testing import assert_allclose

import kvfold
from kvfold import rules

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

try:
    from onnx.reference import ReferenceEvaluator
except ImportError:  # pragma: no cover - older onnx
    pytest.skip("onnx.reference is not available", allow_module_level=True)
if "LinearAttention" not in {s.name for s in onnx.defs.get_all_schemas()}:  # pragma: no cover - older onnx
    pytest.skip("this onnx has no LinearAttention", allow_module_level=True)


def linear_attention_model(update_rule, B, T, H, Hq, dk, dv, decay_last=None, beta_last=None, past=False):
    """A one-node ONNX model; inputs in ONNX's layout (B, T, heads * d)."""
    f = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("query", f, [B, T, Hq * dk]),
        helper.make_tensor_value_info("key", f, [B, T, H * dk]),
        helper.make_tensor_value_info("value", f, [B, T, H * dv]),
    ]
    names = ["query", "key", "value", "", "", ""]
    if past:
        inputs.append(helper.make_tensor_value_info("past_state", f, [B, H, dk, dv]))
        names[3] = "past_state"
    if decay_last:
        inputs.append(helper.make_tensor_value_info("decay", f, [B, T, decay_last]))
        names[4] = "decay"
    if beta_last:
        inputs.append(helper.make_tensor_value_info("beta", f, [B, T, beta_last]))
        names[5] = "beta"
    while names[-1] == "":
        names.pop()
    node = helper.make_node(
        "LinearAttention", names, ["output", "present_state"], q_num_heads=Hq, kv_num_heads=H, update_rule=update_rule
    )
    outputs = [
        helper.make_tensor_value_info("output", f, None),
        helper.make_tensor_value_info("present_state", f, None),
    ]
    model = helper.make_model(
        helper.make_graph([node], "linear_attention", inputs, outputs), opset_imports=[helper.make_opsetid("", 27)]
    )
    model.ir_version = 10
    return model


def to_onnx(x):
    """(B, H, T, d) -> (B, T, H * d)."""
    B, H, T, d = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(B, T, H * d))


def from_onnx(y, H):
    """(B, T, H * d) -> (B, H, T, d)."""
    B, T, Hd = y.shape
    return y.reshape(B, T, H, Hd // H).transpose(0, 2, 1, 3)


def inputs(rng, B, T, H, Hq, dk, dv):
    q = rng.standard_normal((B, Hq, T, dk)).astype(np.float32)
    k = rng.standard_normal((B, H, T, dk))
    k = (k / np.linalg.norm(k, axis=-1, keepdims=True)).astype(np.float32)
    v = rng.standard_normal((B, H, T, dv)).astype(np.float32)
    return q, k, v


# (update_rule, how decay is given, how beta is given)
#   decay: None, "token-head", "token-key", "rule-head" (a constant of the rule), "rule-key"
#   beta:  None, "token", "token-scalar" (ONNX (B, T, 1)), "rule-scalar", "rule-head"
VARIANTS = [
    ("linear", None, None),
    ("gated", "token-head", None),
    ("gated", "token-key", None),
    ("gated", "rule-head", None),
    ("gated", "rule-key", None),
    ("delta", None, "token"),
    ("delta", None, "token-scalar"),
    ("delta", None, "rule-scalar"),
    ("delta", None, "rule-head"),
    ("gated_delta", "token-key", "token"),
    ("gated_delta", "token-head", "token-scalar"),
    ("gated_delta", "rule-key", "rule-scalar"),
    ("gated_delta", "rule-head", "token"),
]

# (B, T, H, Hq, d_k, d_v): multi-head, grouped (GQA), multi-query (MQA), odd sizes
SHAPES = [(1, 9, 2, 2, 8, 8), (2, 7, 2, 4, 7, 5), (1, 11, 1, 3, 17, 3), (2, 5, 3, 6, 1, 33)]


def variant_inputs(rng, variant, B, T, H, dk):
    """The kvfold rule, its per-token keywords, and ONNX's decay/beta inputs for one variant."""
    update_rule, decay_how, beta_how = variant
    rule_args, kw, feeds = {}, {}, {}
    if decay_how:
        per_key = decay_how.endswith("key")
        if decay_how.startswith("rule"):
            g = -rng.uniform(0.01, 0.7, (H, dk) if per_key else (H,))
            rule_args["decay"] = g
            feeds["decay"] = np.broadcast_to(g.reshape(1, 1, -1), (B, T, g.size)).astype(np.float32)
        else:
            g = -rng.uniform(0.01, 0.7, (B, H, T, dk) if per_key else (B, H, T)).astype(np.float32)
            kw["decay"] = g
            feeds["decay"] = to_onnx(g) if per_key else np.ascontiguousarray(g.transpose(0, 2, 1))
    if beta_how:
        if beta_how == "rule-scalar":
            rule_args["beta"] = 0.6
            feeds["beta"] = np.full((B, T, 1), 0.6, np.float32)
        elif beta_how == "rule-head":
            b = rng.uniform(0.1, 1.0, H)
            rule_args["beta"] = b
            feeds["beta"] = np.broadcast_to(b.reshape(1, 1, H), (B, T, H)).astype(np.float32)
        elif beta_how == "token-scalar":  # ONNX's one beta per token for every head
            b = rng.uniform(0.1, 1.0, (B, T, 1)).astype(np.float32)
            kw["beta"] = np.ascontiguousarray(np.broadcast_to(b.transpose(0, 2, 1), (B, H, T)))
            feeds["beta"] = b
        else:
            b = rng.uniform(0.1, 1.0, (B, H, T)).astype(np.float32)
            kw["beta"] = b
            feeds["beta"] = np.ascontiguousarray(b.transpose(0, 2, 1))
    cls = {"linear": rules.Linear, "gated": rules.Gated, "delta": rules.Delta, "gated_delta": rules.GatedDelta}[
        update_rule
    ]
    return cls(**rule_args), kw, feeds


def gate_sizes(feeds):
    """The last dimension of ONNX's decay and beta inputs, None for an absent one."""
    return dict(
        decay_last=feeds["decay"].shape[-1] if "decay" in feeds else None,
        beta_last=feeds["beta"].shape[-1] if "beta" in feeds else None,
    )


def run_onnx(session, q, k, v, feeds, past=None):
    all_feeds = dict(query=to_onnx(q), key=to_onnx(k), value=to_onnx(v), **feeds)
    if past is not None:
        all_feeds["past_state"] = past
    out, state = session.run(None, all_feeds)
    return from_onnx(out, q.shape[1]), state


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_onnx_reference(variant, shape, rng):
    B, T, H, Hq, dk, dv = shape
    q, k, v = inputs(rng, B, T, H, Hq, dk, dv)
    rule, kw, feeds = variant_inputs(rng, variant, B, T, H, dk)
    past = rng.standard_normal((B, H, dk, dv)).astype(np.float32) * 0.3
    model = linear_attention_model(variant[0], B, T, H, Hq, dk, dv, **gate_sizes(feeds), past=True)
    want_out, want_state = run_onnx(ReferenceEvaluator(model), q, k, v, feeds, past)
    cache = kvfold.MemoryCache(rule, num_heads=H, head_dim=dk, value_dim=dv, num_query_heads=Hq, batch_size=B)
    cache.load_memory(past)
    assert_allclose(cache.forward(q, k, v, **kw), want_out, rtol=1e-4, atol=1e-5)
    assert_allclose(cache.memory(), want_state, rtol=1e-4, atol=1e-5)


def test_onnx_requires_exactly_the_gates_kvfold_requires(rng):
    """Both refuse a decay for the delta rule and want one for the gated rule."""
    cache = kvfold.MemoryCache(rules.Delta(), num_heads=1, head_dim=2)
    with pytest.raises(ValueError, match="decay"):
        cache.update(np.ones((1, 1, 2)), np.ones((1, 1, 2)), decay=np.zeros((1, 1)), beta=np.ones((1, 1)))
    model = linear_attention_model("delta", 1, 1, 1, 1, 2, 2, decay_last=1, beta_last=1)
    feeds = dict(
        query=np.ones((1, 1, 2), np.float32),
        key=np.ones((1, 1, 2), np.float32),
        value=np.ones((1, 1, 2), np.float32),
        decay=np.zeros((1, 1, 1), np.float32),
        beta=np.ones((1, 1, 1), np.float32),
    )
    with pytest.raises(ValueError, match="decay"):
        ReferenceEvaluator(model).run(None, feeds)


@pytest.mark.parametrize(
    "variant", [VARIANTS[0], VARIANTS[2], VARIANTS[6], VARIANTS[9]], ids=lambda v: "-".join(str(x) for x in v)
)
def test_continue_an_onnxruntime_state_and_back(variant, rng):
    ort = pytest.importorskip("onnxruntime")
    B, T, H, Hq, dk, dv = 2, 12, 2, 4, 16, 8
    q, k, v = inputs(rng, B, T, H, Hq, dk, dv)
    rule, kw, feeds = variant_inputs(rng, variant, B, T, H, dk)
    half = T // 2

    model = linear_attention_model(variant[0], B, half, H, Hq, dk, dv, **gate_sizes(feeds), past=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    zero = np.zeros((B, H, dk, dv), np.float32)
    ort_first, ort_state = run_onnx(
        sess, q[:, :, :half], k[:, :, :half], v[:, :, :half], {n: a[:, :half] for n, a in feeds.items()}, zero
    )
    ort_second, ort_final = run_onnx(
        sess, q[:, :, half:], k[:, :, half:], v[:, :, half:], {n: a[:, half:] for n, a in feeds.items()}, ort_state
    )

    # ONNX Runtime's state continued in kvfold
    cache = kvfold.MemoryCache(rule, num_heads=H, head_dim=dk, value_dim=dv, num_query_heads=Hq, batch_size=B)
    cache.load_memory(ort_state)
    assert_allclose(
        cache.forward(q[:, :, half:], k[:, :, half:], v[:, :, half:], **{n: a[:, :, half:] for n, a in kw.items()}),
        ort_second,
        rtol=1e-4,
        atol=1e-5,
    )
    assert_allclose(cache.memory(), ort_final, rtol=1e-4, atol=1e-5)

    # kvfold's state continued in ONNX Runtime
    cache = kvfold.MemoryCache(rule, num_heads=H, head_dim=dk, value_dim=dv, num_query_heads=Hq, batch_size=B)
    assert_allclose(
        cache.forward(q[:, :, :half], k[:, :, :half], v[:, :, :half], **{n: a[:, :, :half] for n, a in kw.items()}),
        ort_first,
        rtol=1e-4,
        atol=1e-5,
    )
    again, _ = run_onnx(
        sess, q[:, :, half:], k[:, :, half:], v[:, :, half:], {n: a[:, half:] for n, a in feeds.items()}, cache.memory()
    )
    assert_allclose(again, ort_second, rtol=1e-4, atol=1e-5)
