"""FoldCache with kvfold's attention (attn_implementation="kvfold") in tiny randomly initialized models:
exact against DynamicCache and a hand-written StreamingLLM mask, the C++ memory against the NumPy model
through the same attention function, RoPE-aware folding on the model's own keys, and the errors."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    DynamicCache,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

import kvfold.hf  # noqa: E402,F401  (registers the "kvfold" attention)
from kvfold import MemoryCache, RoPE, rules  # noqa: E402
from kvfold.hf import FoldCache  # noqa: E402
from kvfold.reference import ReferenceCache, StreamCache  # noqa: E402
from tiny_models import run, token_ids  # noqa: E402
from tiny_models import tiny as tiny_model  # noqa: E402

pytestmark = pytest.mark.one_backend  # the attention kernels are tested per backend elsewhere

LENGTH = 29


def tiny(family="Llama", attention="kvfold", seed=0):
    return tiny_model(family, attention, seed, rope_theta=1000.0)


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def ids():
    return token_ids(LENGTH)


def close(a, b, atol=1e-4):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("chunk", [0, 1, 5], ids=["prefill", "decode", "chunked"])
def test_window_longer_than_text_equals_dynamic_cache(model, ids, chunk):
    expected = run(model, ids, DynamicCache(), chunk)  # a DynamicCache goes to sdpa
    with torch.no_grad():
        close(expected, model(ids).logits)
    cache = FoldCache(rules.Drop(), window=LENGTH)
    close(run(model, ids, cache, chunk), expected)
    assert {layer.attention for layer in cache.layers} == {"kvfold"}
    assert cache.get_seq_length() == LENGTH and cache.layers[0].memory.num_query_heads == 6
    # tova and h2o keep everything too, and so does Merge with a slot for every pair, un-rotated with the
    # model's RoPE and rotated back at each pair's own position
    for memory in (MemoryCache, StreamCache):
        for kw in (dict(retain="tova", window=LENGTH), dict(retain="h2o", window=LENGTH)):
            close(run(model, ids, FoldCache(rules.Drop(), memory=memory, **kw), chunk), expected)
        rope = RoPE.from_config(model.config)
        merged = FoldCache(rules.Merge(LENGTH), window=2, sinks=1, rope=rope, memory=memory)
        close(run(model, ids, merged, chunk), expected)


@pytest.mark.parametrize("family", ["Qwen2", "Mistral"])
def test_other_llama_family_models(family, ids):
    model = tiny(family, seed=1)
    expected = run(model, ids, DynamicCache(config=model.config), 4)
    close(run(model, ids, FoldCache(window=LENGTH), 4), expected)
    got = run(model, ids, FoldCache(rules.Drop(), window=5, sinks=2), 4)
    with torch.no_grad():
        close(got, model(ids, attention_mask=streaming_mask(LENGTH, 2, 5).expand(2, 1, LENGTH, LENGTH)).logits)


def streaming_mask(length, sinks, window):
    """Additive (1, 1, L, L) mask of StreamingLLM as kvfold's attention runs it, token by token whatever
    the blocks: token t sees the first ``sinks`` tokens and the ``window`` newest ones, itself included."""
    t, j = np.arange(length)[:, None], np.arange(length)[None, :]
    allowed = (j <= t) & ((j < sinks) | (j > t - window))
    return torch.from_numpy(np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32))[None, None]


@pytest.mark.parametrize("sinks, window, chunk", [(2, 5, 1), (4, 3, 6), (0, 7, 29)])
def test_streaming_llm_matches_masked_attention(model, ids, sinks, window, chunk):
    got = run(model, ids, FoldCache(rules.Drop(), window=window, sinks=sinks), chunk)
    mask = streaming_mask(LENGTH, sinks, window).expand(ids.shape[0], 1, LENGTH, LENGTH)
    with torch.no_grad():  # no cache: the kvfold attention is sdpa with this mask
        expected = model(ids, attention_mask=mask).logits
        assert (model(ids).logits - expected).abs().max() > 1e-2  # the mask is not trivial
    close(got, expected)


RULES = [
    (rules.Merge(3), {}),
    (rules.Merge(2, bias=None), {}),
    (rules.Cumulative(), dict(window=4, sinks=1)),
    (rules.Compressive(2, 3), dict(window=3)),
    (rules.Merge(4), dict(window=5, sinks=2)),
    (rules.Merge(3), dict(window=4, sinks=1, retain="tova")),
    (rules.Merge(2), dict(window=5, sinks=1, retain="h2o", recent=2)),
    (rules.Drop(), dict(window=6, retain="tova")),
    (rules.Merge(3), dict(window=3, sinks=1, rope="model")),
    (rules.Cumulative(), dict(window=4, sinks=1, rope="model", retain="tova")),
    (rules.Compressive(2, 2), dict(window=3, rope="model", retain="h2o")),
]


@pytest.mark.parametrize("rule, kw", RULES, ids=lambda x: repr(x) if isinstance(x, rules.Rule) else str(x))
@pytest.mark.parametrize("chunk", [1, 7], ids=["decode", "chunked"])
def test_the_cpp_memory_is_the_numpy_model_through_the_attention(model, ids, rule, kw, chunk):
    if kw.get("rope") == "model":
        kw = dict(kw, rope=RoPE.from_config(model.config))
    got = run(model, ids, FoldCache(rule, **kw), chunk)
    expected = run(model, ids, FoldCache(rule, memory=StreamCache, **kw), chunk)
    close(got, expected)
    if rule.bias if isinstance(rule, rules.Merge) else False:  # the bias matters
        other = run(model, ids, FoldCache(rules.Merge(rule.slots, bias=None), memory=StreamCache, **kw), chunk)
        assert (other - expected).abs().max() > 1e-3


def test_blocks_are_token_by_token(model, ids):
    """forward is a loop of step: chunked prefill gives the logits of one token at a time."""
    for cache_kw in (dict(rule=rules.Merge(3), window=4, sinks=1), dict(rule=rules.Drop(), window=6)):
        close(run(model, ids, FoldCache(**cache_kw), 1), run(model, ids, FoldCache(**cache_kw), 9))
    kw = dict(rule=rules.Merge(3), window=5, sinks=1, retain="tova", rope=RoPE.from_config(model.config))
    close(run(model, ids[:, :15], FoldCache(**kw), 1), run(model, ids[:, :15], FoldCache(**kw), 5))


def test_rope_from_config_unrotates_the_model_keys(model):
    """Layer 0's keys of one token repeated differ only by their rotation: un-rotated they are one vector,
    so their running mean is the key of the token at position 0. A wrong layout would not give that."""
    x = torch.full((1, 9), 17)
    first = FoldCache(rules.Cumulative(), rope=RoPE.from_config(model.config))
    run(model, x[:, :1], first, 1)
    for layout, same in (("half", True), ("interleaved", False)):
        rope = RoPE(model.config.rope_parameters["rope_theta"], layout=layout)
        cache = FoldCache(rules.Cumulative(), rope=rope)
        run(model, x, cache, 3)
        a, b = cache.layers[0].memory.memory()[0], first.layers[0].memory.memory()[0]
        assert np.allclose(a, b, atol=1e-5) == same


SCALED_ROPES = [
    dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
    ),
    dict(rope_type="linear", factor=4.0),
    dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=64),  # (its cos/sin scale too)
]


@pytest.mark.parametrize("scaling", SCALED_ROPES, ids=lambda s: s["rope_type"])
def test_a_scaled_rope_is_read_from_the_config(ids, scaling):
    """RoPE.from_config takes a scaled RoPE's frequencies as the model computes them. With them, one token's
    layer-0 keys at 9 positions un-rotate to one vector (their running mean is the first one's key); with
    theta's they do not."""
    model = tiny_model("Llama", "kvfold", 0, rope_parameters=dict(scaling, rope_theta=1000.0))
    rope = RoPE.from_config(model.config)
    assert rope.frequencies == tuple(model.model.rotary_emb.inv_freq.tolist())
    merged = FoldCache(rules.Merge(LENGTH), window=2, sinks=1, rope=rope)
    close(run(model, ids, merged, 7), run(model, ids, DynamicCache(), 0))
    x = torch.full((1, 9), 17)
    first = FoldCache(rules.Cumulative(), rope=rope)
    run(model, x[:, :1], first, 1)
    for r, same in ((rope, True), (RoPE(1000.0), False)):
        cache = FoldCache(rules.Cumulative(), rope=r)
        run(model, x, cache, 3)
        a, b = cache.layers[0].memory.memory()[0], first.layers[0].memory.memory()[0]
        assert np.allclose(a, b, atol=1e-5) == same


def test_generate_beam_search_and_assisted_decoding(model, ids):
    prompt = ids[:1, :9]
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False, pad_token_id=0)
    expected = model.generate(prompt, **kw)
    assert torch.equal(model.generate(prompt, cache=FoldCache(window=64), **kw), expected)
    beams = dict(kw, num_beams=3)
    assert torch.equal(model.generate(prompt, cache=FoldCache(window=64), **beams), model.generate(prompt, **beams))
    repeats = torch.tensor([[5, 6, 7, 8, 9] * 4])  # prompt lookup proposes drafts, some rejected: crops
    kw = dict(attention_mask=torch.ones_like(repeats), max_new_tokens=16, do_sample=False, pad_token_id=0)
    expected = model.generate(repeats, **kw)
    for memory in (MemoryCache, StreamCache):
        cache = FoldCache(window=64, memory=memory)
        assert torch.equal(model.generate(repeats, cache=cache, prompt_lookup_num_tokens=3, **kw), expected)


def test_crop_replays_the_kept_queries(model, ids):
    """A crop rolls back to before the block and feeds the kept tokens again with their queries, so
    attention-chosen retention ends where a cache that only saw the kept tokens ends."""
    kw = dict(rule=rules.Merge(2), window=3, sinks=1, retain="tova")
    cache = FoldCache(**kw)
    cache.activate_past_recording()
    run(model, ids[:, :12], cache, 4)
    cache.crop(-5)
    got = run(model, ids[:, 7:16], cache, 3)
    replay = FoldCache(**kw)
    run(model, ids[:, :4], replay, 4)
    run(model, ids[:, 4:7], replay, 3)
    close(got, run(model, ids[:, 7:16], replay, 3), atol=1e-5)


def test_what_only_kvfold_attention_applies_is_refused_elsewhere(ids):
    sdpa = tiny(attention="sdpa")
    for cache in (FoldCache(rules.Merge(4), window=2), FoldCache(retain="tova", window=4)):
        with pytest.raises(ValueError, match="attn_implementation='kvfold'"):
            run(sdpa, ids, cache, 4)
    # without them, sdpa and eager run as before, bias-free Merge and a RoPE included
    rope = RoPE.from_config(sdpa.config)
    close(
        run(sdpa, ids, FoldCache(rules.Merge(LENGTH, bias=None), rope=rope), 4),
        run(sdpa, ids, DynamicCache(), 4),
    )


class Plain(ReferenceCache):
    """A memory class whose constructor takes no rope."""

    def __init__(self, rule, num_heads, head_dim, **kw):
        super().__init__(rule, num_heads, head_dim, **kw)


def test_bad_arguments():
    with pytest.raises(ValueError, match="retain: ReferenceCache takes no retain; kvfold.MemoryCache"):
        FoldCache(retain="tova", window=4, memory=ReferenceCache)
    with pytest.raises(ValueError, match="rope: Plain takes no rope"):
        FoldCache(rope=RoPE(1e4), memory=Plain)
    with pytest.raises(ValueError, match="retain: expected one of 'fifo', 'tova', 'h2o', got 'lru'"):
        FoldCache(retain="lru")
    with pytest.raises(ValueError, match=r"recent: expected an integer in \[0, window=4\], got 9"):
        FoldCache(retain="h2o", recent=9, window=4)
    with pytest.raises(TypeError, match="rope: expected a kvfold.RoPE"):
        FoldCache(rope=1e4)
    with pytest.raises(ValueError, match="dtype: StreamCache computes in float64"):
        FoldCache(dtype="float16", memory=StreamCache)


def test_a_bad_block_changes_nothing(model, ids):
    cache = FoldCache(rules.Merge(3), window=4)
    run(model, ids[:, :6], cache, 3)
    layer = cache.layers[0]
    bad = torch.zeros(2, 2, 1, 8)
    bad[0, 1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        layer.update(bad, bad)
    assert layer.get_seq_length() == 6 and layer.memory.length.tolist() == [6, 6]
    close(run(model, ids[:, 6:9], cache, 3), run(model, ids[:, 6:9], _fed(model, ids[:, :6]), 3))


def _fed(model, ids):
    cache = FoldCache(rules.Merge(3), window=4)
    run(model, ids, cache, 3)
    return cache


def test_padding_is_refused_not_ignored_and_a_model_window_is_kept(model, ids):
    """kvfold's attention reads no mask: a padded batch would be attended wrongly, so it is refused, and the
    cache stays as it was. The mask of a model's sliding window is no padding, and a layer under a sliding
    window shorter than the cache's keeps exactly the model's window."""
    mask = torch.ones_like(ids[:, :8])
    mask[0, :3] = 0  # row 0 left-padded
    cache = FoldCache(window=64)
    with torch.no_grad(), pytest.raises(ValueError, match="attention_mask: kvfold's attention takes the causal"):
        model(ids[:, :8], attention_mask=mask, cache=cache)
    assert cache.get_seq_length() == 0 and all(layer._block is None for layer in cache.layers)
    close(run(model, ids, cache, 5), run(model, ids, DynamicCache(), 5))  # then unpadded, as a fresh cache
    mistral = tiny("Mistral")
    mistral.config.sliding_window = 5
    # each token reads its last 5 pairs, as the model does, also in a block longer than the model's window
    # (whose mask hides the block's own older pairs); a longer cache window keeps the model's 5 pairs
    for chunk in (4, 12):
        expected = run(mistral, ids, DynamicCache(), chunk)
        close(run(mistral, ids, FoldCache(window=5), chunk), expected)
        longer = FoldCache(rules.Merge(3), window=8, sinks=2, rope=RoPE(1000.0), retain="tova")
        close(run(mistral, ids, longer, chunk), expected)
        assert {(layer.memory.window, layer.memory.sinks, repr(layer.memory.rule)) for layer in longer.layers} == {
            (5, 0, "Drop()")
        }
    cache = FoldCache(window=5)
    with torch.no_grad(), pytest.raises(ValueError, match="attention_mask: kvfold's attention takes the causal"):
        mistral(ids[:, :8], attention_mask=mask, cache=cache)  # padding is still refused


def test_local_and_global_layers_of_gemma3():
    """Gemma 3 alternates layers under a sliding window (local) with layers that read everything (global).
    A cache window longer than the local one: the local layers keep exactly the model's window, the global
    ones fold, the C++ memory as the NumPy model. A window within it: every layer folds."""
    config = Gemma3TextConfig(
        vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], attn_implementation="kvfold",
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        },
    )  # fmt: skip
    torch.manual_seed(0)
    gemma = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in gemma.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    ids = token_ids(LENGTH)
    expected = run(gemma, ids, DynamicCache(config=config), 0)
    close(run(gemma, ids, FoldCache(window=LENGTH), 5), expected)
    kw = dict(rule=rules.Merge(3), window=10, sinks=1, retain="tova")
    cache = FoldCache(**kw)
    got = run(gemma, ids, cache, 5)
    close(got, run(gemma, ids, FoldCache(memory=StreamCache, **kw), 5))
    assert [(layer.memory.window, layer.memory.rule) for layer in cache.layers] == [
        (6, rules.Drop()),
        (10, rules.Merge(3)),
        (6, rules.Drop()),
    ]
    assert (got - expected).abs().max() > 1e-3  # the global layer folded
    within = FoldCache(rules.Merge(3), window=4, sinks=1)
    run(gemma, ids, within, 5)
    assert {(layer.memory.window, layer.memory.rule) for layer in within.layers} == {(4, rules.Merge(3))}
    # Each layer type has its RoPE. One token repeated: the global layer's keys, un-rotated with the global
    # RoPE, are one vector (the local layers keep the model's window and fold nothing)
    assert RoPE.from_config(config, "sliding_attention") == RoPE(10000.0)
    rope = RoPE.from_config(config, "full_attention")
    assert rope.frequencies == tuple(gemma.model.rotary_emb.full_attention_inv_freq.tolist())
    with pytest.raises(ValueError, match=r"layer_type: .* expected one of \['full_attention', 'sliding_attention'\]"):
        RoPE.from_config(config)
    x = torch.full((1, 16), 17)
    first = FoldCache(rules.Cumulative(), window=7, rope=rope)
    run(gemma, x[:, :8], first, 8)  # the global layer folds position 0
    for r, same in ((rope, True), (RoPE(1e6), False)):
        cache = FoldCache(rules.Cumulative(), window=7, rope=r)
        run(gemma, x, cache, 4)
        a, b = cache.layers[1].memory.memory()[0], first.layers[1].memory.memory()[0]
        assert np.allclose(a, b, atol=1e-5) == same
    # rope="model": every layer folds with its own type's RoPE, local layers too when the window fits theirs
    first = FoldCache(rules.Cumulative(), window=4, rope="model")
    run(gemma, x[:, :5], first, 5)
    cache = FoldCache(rules.Cumulative(), window=4, rope="model")
    run(gemma, x, cache, 4)
    assert [layer.memory.rope for layer in cache.layers] == [RoPE(10000.0), rope, RoPE(10000.0)]
    for a, b in zip(cache.layers, first.layers):
        np.testing.assert_allclose(a.memory.memory()[0], b.memory.memory()[0], atol=1e-5)


def test_layers_without_rope_fold_their_keys_as_they_are():
    """SmolLM3 leaves the keys of some layers unrotated (NoPE): with rope= the other layers un-rotate theirs,
    these fold them as they are. One token repeated: in both kinds of layer the folded keys are one vector."""
    config = SmolLM3Config(
        vocab_size=101, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=48, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
        no_rope_layers=[1, 0], attn_implementation="kvfold",
    )  # fmt: skip
    torch.manual_seed(0)
    smol = SmolLM3ForCausalLM(config).eval()
    assert [layer.self_attn.use_rope for layer in smol.model.layers] == [1, 0]
    rope = RoPE.from_config(config)
    ids = token_ids(LENGTH)
    close(
        run(smol, ids, FoldCache(rules.Merge(LENGTH), window=2, sinks=1, rope=rope), 5),
        run(smol, ids, DynamicCache(), 0),
    )
    x = torch.full((1, 9), 17)
    first = FoldCache(rules.Cumulative(), rope=rope)
    run(smol, x[:, :1], first, 1)
    cache = FoldCache(rules.Cumulative(), rope=rope)
    run(smol, x, cache, 3)
    assert [layer.memory.rope for layer in cache.layers] == [rope, None]
    for a, b in zip(cache.layers, first.layers):
        np.testing.assert_allclose(a.memory.memory()[0], b.memory.memory()[0], atol=1e-5)
    model_rope = FoldCache(rules.Cumulative(), rope="model")
    run(smol, x, model_rope, 3)
    assert [layer.memory.rope for layer in model_rope.layers] == [rope, None]


def test_the_model_s_rope_needs_kvfold_attention(ids):
    """rope="model" is read off the model's attention modules, which only kvfold's attention sees."""
    sdpa = tiny(attention="sdpa")
    cache = FoldCache(rules.Cumulative(), window=4, rope="model")
    with pytest.raises(ValueError, match="rope='model' takes each layer's RoPE from the model's attention"):
        run(sdpa, ids, cache, 5)
    with pytest.raises(ValueError, match="rope: expected a kvfold.RoPE, 'model' or None, got 'auto'"):
        FoldCache(rope="auto")
    with pytest.raises(TypeError, match="rope: expected a kvfold.RoPE, 'model' or None, got float"):
        FoldCache(rope=1e4)


@pytest.mark.parametrize("family", ["Cohere", "Glm"])
def test_the_layout_of_the_rotation_is_the_model_s(family):
    """Cohere and GLM pair dimensions 2i and 2i + 1 (GLM rotates half the head): from_config reads that off the
    model's code. One token repeated: its keys un-rotate to one vector with that layout, not with Llama's."""
    config = getattr(transformers, f"{family}Config")(
        vocab_size=101, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=48, intermediate_size=96,
        num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=2, attn_implementation="kvfold",
    )  # fmt: skip
    torch.manual_seed(0)
    lm = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    rope = RoPE.from_config(config)
    assert rope.layout == "interleaved"
    x = torch.full((1, 9), 17)
    first = FoldCache(rules.Cumulative(), rope=rope)
    run(lm, x[:, :1], first, 1)
    for r, same in ((rope, True), (RoPE(rope.theta, rope.dim, "half"), False)):
        cache = FoldCache(rules.Cumulative(), rope=r)
        run(lm, x, cache, 3)
        assert np.allclose(cache.layers[0].memory.memory()[0], first.layers[0].memory.memory()[0], atol=1e-5) == same


def test_what_kvfold_attention_cannot_apply_is_refused():
    """Gemma 2 soft-caps its attention logits: kvfold's attention would not, so it refuses, and the cache is
    as before."""
    config = transformers.Gemma2Config(
        vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8, attn_implementation="kvfold",
    )  # fmt: skip
    gemma2 = transformers.Gemma2ForCausalLM(config).eval()
    cache = FoldCache(window=8)
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match=r"softcap: kvfold's attention does not apply the model's logit"),
    ):
        gemma2(token_ids(5), cache=cache)
    assert cache.get_seq_length() == 0 and all(layer._block is None for layer in cache.layers)


def test_a_reset_cache_is_a_fresh_one(model, ids):
    prompt = ids[:1, :9]
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)
    cache = FoldCache(rules.Cumulative(), window=4)
    model.generate(prompt, cache=cache, num_beams=3, **kw)  # three rows
    cache.reset()
    assert torch.equal(
        model.generate(prompt, cache=cache, **kw),
        model.generate(prompt, cache=FoldCache(rules.Cumulative(), window=4), **kw),
    )


def test_recording_keeps_what_a_crop_can_reach_and_no_more(model, ids):
    cache = FoldCache(rules.Cumulative(), window=4, sinks=1)
    cache.activate_past_recording(recurrent_states_to_keep=3)  # as transformers asks for assisted decoding
    run(model, ids, cache, 1)
    assert max(len(layer._history) for layer in cache.layers) <= 4  # not one per token fed
    with pytest.raises(ValueError, match="crop: cannot remove 5 of 29 tokens"):
        cache.crop(-5)
    cache.crop(-3)
    replay = FoldCache(rules.Cumulative(), window=4, sinks=1)
    run(model, ids[:, :26], replay, 1)
    close(run(model, ids[:, 26:], cache, 1), run(model, ids[:, 26:], replay, 1), atol=1e-5)


def test_a_rule_the_memory_refuses_leaves_the_cache_as_before(ids):
    model = tiny()
    cache = FoldCache(rules.Custom(lambda mk, mv, k, v, n: (mk, mv)), window=2, retain="tova")
    for _ in range(2):  # the same clear error each time, nothing half made
        with torch.no_grad(), pytest.raises(ValueError, match="retain: 'tova' chooses which pair"):
            model(ids[:, :4], cache=cache)
        assert cache.get_seq_length() == 0 and all(layer._block is None for layer in cache.layers)
    with pytest.raises(ValueError, match=r"window: expected an integer in \[0, 4294967296\], got 1099511627776"):
        FoldCache(window=2**40)
