"""The command line: parsing, checks before anything loads, the demo (no model needed)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kvfold
from kvfold import rules
from kvfold.__main__ import main
from kvfold.tools.generate import RULE_HELP, RULES, parse_rule


@pytest.mark.parametrize(
    "text, rule",
    [
        ("full", None),
        ("drop", rules.Drop()),
        ("Cumulative", rules.Cumulative()),
        ("moving:32", rules.Moving(32)),
        ("weighted:1,2,4", rules.Weighted((1.0, 2.0, 4.0))),
        ("ema:0.05", rules.EMA(0.05)),
        ("compressive:8,4", rules.Compressive(8, 4)),
        ("compressive:8,4,max", rules.Compressive(8, 4, "max")),
        ("merge:16", rules.Merge(16)),
        ("merge:16,none", rules.Merge(16, bias=None)),
    ],
)
def test_parse_rule(text, rule):
    assert parse_rule(text) == rule


@pytest.mark.parametrize(
    "text",
    ["", "ema", "ema:x", "ema:2", "moving:1,2", "gru", "custom", "linear", "compressive:8", "drop:3", "weighted"],
)
def test_parse_rule_refuses_malformed_rules(text):
    with pytest.raises(ValueError, match="rule: "):
        parse_rule(text)


def test_command_line_rules_are_the_summary_rules_of_plain_parameters():
    """The rules the command line spells come from the rules' declarations: every summary rule whose
    parameters are numbers and names, none that needs arrays or a function, no matrix rule."""
    assert {"drop", "cumulative", "moving", "weighted", "ema", "compressive", "merge"} <= set(RULES)
    assert not {"gru", "custom", "linear", "gated", "delta", "gated_delta"} & set(RULES)
    assert set(RULES) < set(rules.kinds())
    for kind in RULES:
        assert kind in RULE_HELP


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--budgets", "4"],
        ["eval", "--budgets", "64,x"],
        ["generate", "--prompt", "hi", "--rule", "ema:3"],
        ["generate", "--rule", "ema:0.1"],
    ],
)
def test_bad_command_lines_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    assert "usage: kvfold" in capsys.readouterr().err


def run_kvfold(*args, path=None):
    """``python -m kvfold ARGS`` in a fresh interpreter; ``path`` goes first on PYTHONPATH."""
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "kvfold", *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.one_backend
def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvfold {kvfold.__version__}"


@pytest.mark.one_backend
def test_the_console_script_and_python_m_both_run():
    assert run_kvfold("--version").stdout.strip() == f"kvfold {kvfold.__version__}"
    script = Path(sys.executable).parent / ("kvfold.exe" if os.name == "nt" else "kvfold")
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == f"kvfold {kvfold.__version__}"


BAD_NUMBERS = [
    ["demo", "--tokens", "-5"],
    ["demo", "--tokens", "0"],
    ["demo", "--check", "-1"],
    ["demo", "--heads", "0"],
    ["demo", "--head-dim", "0"],
    ["demo", "--heads", "two"],
    ["eval", "--tokens", "1"],
    ["eval", "--chunk", "0"],
    ["eval", "--threads", "0"],
    ["eval", "--segments", "0"],
    ["eval", "--budgets", "64,8"],
    ["generate", "--prompt", "hi", "--window", "-5"],
    ["generate", "--prompt", "hi", "--sinks", "-1"],
    ["generate", "--prompt", "hi", "--max-new-tokens", "0"],
    ["generate", "--prompt", "hi", "--temperature", "0"],
    ["generate", "--prompt", "hi", "--temperature", "nan"],
    ["generate", "--prompt", "hi", "--top-p", "1.5"],
    ["generate", "--prompt", "hi", "--seed", "-1"],
    ["bench", "--rounds", "0"],
    ["bench", "--threads", "1", "0"],
    ["bench", "--threads", "1", "99999"],
]


@pytest.mark.one_backend
@pytest.mark.parametrize("argv", BAD_NUMBERS, ids=" ".join)
def test_bad_numbers_are_usage_errors_before_anything_loads(argv, capsys, monkeypatch):
    from kvfold.tools import bench, demo, smollm2

    def loaded(*args, **kwargs):
        raise AssertionError("a tool ran on a bad command line")

    for module, name in [(smollm2, "load"), (smollm2, "model_file"), (bench, "run"), (demo, "run")]:
        monkeypatch.setattr(module, name, loaded)
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "usage: kvfold" in err
    flag = [a for a in argv if a.startswith("--")][-1]
    assert f"argument {flag}: expected " in err and repr(argv[-1]) in err


BAD_MEMORIES = [
    (["--recent", "3"], "recent: only retain='h2o' keeps a recent part, got recent=3 with retain='tova'"),
    (["--retain", "h2o", "--window", "8", "--recent", "9"], "recent: expected an integer in [0, window=8], got 9"),
    (["--rule", "full", "--retain", "tova"], "retain: the full cache keeps every pair and folds none"),
    (["--rule", "full", "--recent", "2"], "recent: the full cache keeps every pair and folds none"),
    (["--dtype", "float64"], "dtype: expected 'float32', 'float16', 'bfloat16' or 'int8', got 'float64'"),
    (["--rule", "full", "--dtype", "int8"], "dtype: the full cache keeps the model's own tensors, got dtype='int8'"),
]


@pytest.mark.one_backend
@pytest.mark.parametrize("argv, message", BAD_MEMORIES, ids=[" ".join(a) for a, _ in BAD_MEMORIES])
def test_memories_that_cannot_be_are_usage_errors_before_the_model_loads(argv, message, capsys, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from kvfold.tools import smollm2

    def loaded(*args, **kwargs):
        raise AssertionError("the model loaded for a memory that cannot be")

    monkeypatch.setattr(smollm2, "model_file", lambda: Path("SmolLM2.gguf"))  # as if installed
    monkeypatch.setattr(smollm2, "load", loaded)
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--prompt", "hi", *argv])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "usage: kvfold" in err and f"error: generate: {message}" in err


@pytest.mark.one_backend
def test_generate_writes_with_the_best_memory_of_64_pairs_unless_told_otherwise():
    from kvfold.__main__ import _parser

    args = _parser().parse_args(["generate", "--prompt", "hi"])
    assert (args.rule, args.window, args.sinks, args.rope, args.retain, args.recent, args.dtype) == (
        rules.Merge(16),
        48,
        0,
        True,
        None,
        None,
        "float32",
    )
    args = _parser().parse_args(
        ["generate", "--prompt", "hi", "--rule", "ema:0.1", "--no-rope", "--retain", "h2o", "--recent", "2"]
    )
    assert (args.rule, args.rope, args.retain, args.recent) == (rules.EMA(0.1), False, "h2o", 2)


@pytest.fixture
def eval_without_model(monkeypatch):
    """kvfold.tools.eval with a model load that fails the test: what is checked must come first."""
    from kvfold.tools import eval as kveval
    from kvfold.tools import smollm2

    def loaded(*args, **kwargs):
        raise AssertionError("the model loaded before the options were checked")

    monkeypatch.setattr(smollm2, "load", loaded)
    return kveval


@pytest.mark.one_backend
def test_eval_refuses_budgets_that_hold_a_whole_segment_before_the_model_loads(eval_without_model):
    with pytest.raises(ValueError, match=r"^budgets: expected budgets below tokens=64 .*, got \[64, 128\]$"):
        eval_without_model.run(tokens=64, budgets=(64, 128), progress=False)


@pytest.mark.one_backend
def test_eval_refuses_a_text_it_cannot_read_before_the_model_loads(eval_without_model, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9".encode("latin-1"))
    for path, words in [
        (tmp_path / "missing.txt", r"^text: expected a readable file, '.*missing\.txt': No such file or directory$"),
        (tmp_path, r"^text: expected a readable file, '.*': Is a directory$"),
        (latin1, r"^text: expected a UTF-8 file, '.*latin1\.txt' has byte 0xe9 at 3$"),
    ]:
        with pytest.raises(ValueError, match=words):
            eval_without_model.run(tokens=64, budgets=(16,), progress=False, text=str(path))


@pytest.mark.one_backend
def test_eval_refuses_an_out_folder_it_cannot_make_before_the_model_loads(eval_without_model, tmp_path):
    file = tmp_path / "results"
    file.write_text("")
    for out, words in [(file, "File exists"), (file / "eval", "Not a directory")]:
        with pytest.raises(ValueError, match=rf"^out: expected a folder kvfold can write, '.*': {words}$"):
            eval_without_model.run(tokens=64, budgets=(16,), progress=False, out=str(out))
    made = tmp_path / "new" / "eval"
    assert eval_without_model.writable_folder(str(made)) == made and made.is_dir()


def hidden(tmp_path, module):
    """A folder that, first on PYTHONPATH, makes ``import module`` fail as if it were not installed."""
    (tmp_path / module).mkdir()
    (tmp_path / module / "__init__.py").write_text(f"raise ImportError({'No module named ' + module!r})\n")
    return tmp_path


@pytest.mark.one_backend
@pytest.mark.parametrize("module", ["torch", "transformers"])
@pytest.mark.parametrize("argv", [["generate", "--prompt", "hi"], ["eval", "--tokens", "16"]], ids=lambda a: a[0])
def test_model_commands_without_their_packages_say_what_to_install(tmp_path, module, argv):
    out = run_kvfold(*argv, path=hidden(tmp_path, module))
    # the first package found missing is named: torch when it is not installed at all
    missing = "torch" if importlib.util.find_spec("torch") is None else module
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.strip() == (
        f"kvfold {argv[0]}: needs {missing}, which is not installed: install kvfold[hf] (pip install 'kvfold[hf]')"
    )


@pytest.mark.one_backend
def test_demo_compares_with_the_reference_and_a_full_cache(capsys):
    assert main(["demo", "--tokens", "300", "--check", "40", "--heads", "2", "--head-dim", "8"]) == 0
    out = capsys.readouterr().out
    full = 300 * 2 * 8 * 2 * 4  # tokens x heads x (key + value) x float32
    assert f"full float32 KV cache of these 300 tokens would hold {full:,} bytes" in out
    assert "kvfold.reference (kvfold's NumPy implementation written from the formulas)" in out
    rows = [line for line in out.splitlines() if line.startswith(("window", "sinks", "cumulative", "gated", "TOVA"))]
    assert len(rows) == 12
    for row in rows:
        assert float(row.split()[-1]) < 1e-4  # the relative difference from the reference


@pytest.mark.one_backend
def test_the_demo_stream_comes_in_blocks():
    from kvfold.tools.demo import _stream

    blocks = list(_stream(2500, heads=2, query_heads=4, d=8, block=1024))
    assert [len(q) for q, _, _ in blocks] == [1024, 1024, 452]
    for q, k, v in blocks:
        assert q.shape[1:] == (4, 8) and k.shape[1:] == v.shape[1:] == (2, 8)
    again = list(_stream(2500, heads=2, query_heads=4, d=8, block=1024))
    for a, b in zip(blocks, again):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


@pytest.mark.one_backend
def test_bench_quick_runs_one_short_round_on_one_thread_without_long_prefills(monkeypatch):
    from kvfold.tools import bench

    calls = []
    monkeypatch.setattr(bench, "run", lambda cases, **options: calls.append((cases, options)))
    assert main(["bench", "--quick"]) == 0
    assert main(["bench", "--quick", "--cases", "T2048", "--threads", "2"]) == 0
    assert main(["bench", "--rounds", "3"]) == 0
    (quick, options), (named, named_options), (full, full_options) = calls
    assert quick == [c for c in bench.CASES if c.tokens <= 512] and len(quick) < len(bench.CASES)
    assert options["threads"] == [1] and options["rounds"] == 1 and options["quick"]
    assert [c.name for c in named] == [c.name for c in bench.CASES if "T2048" in c.name] and named
    assert named_options["threads"] == [2]
    assert full == bench.CASES and full_options["threads"] == [] and full_options["rounds"] == 3
    assert not full_options["quick"]


def test_eval_selects_memories_by_kind():
    from kvfold.tools import eval as kveval

    grid = kveval.memories([64])
    chosen = kveval.select(grid, ["sinks 4 + window", "TOVA"])
    assert [m.name for m in chosen] == ["full cache", "sinks 4 + window 60", "TOVA 64"]
    assert kveval.select(grid, None) == grid
    shares = kveval.select(grid, ["TOVA + merge N/8, RoPE, log-count", "TOVA + merge N/4, RoPE, log-count"])
    assert [m.name for m in shares[1:]] == ["TOVA 56 + merge 8, RoPE, log-count", "TOVA 48 + merge 16, RoPE, log-count"]
    assert [(m.window, m.rule.slots, m.budget) for m in shares[1:]] == [(56, 8, 64), (48, 16, 64)]
    with pytest.raises(ValueError, match=r"kinds: expected kinds among .*got \['window'\]"):
        kveval.select(grid, ["window"])
