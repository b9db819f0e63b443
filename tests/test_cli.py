"""The command line's parsing (no model needed)."""

import pytest

from kvfold import rules
from kvfold.__main__ import main
from kvfold.tools.generate import parse_rule


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
    ],
)
def test_parse_rule(text, rule):
    assert parse_rule(text) == rule


@pytest.mark.parametrize("text", ["", "ema", "ema:x", "ema:2", "moving:1,2", "gru", "compressive:8", "drop:3"])
def test_parse_rule_refuses_malformed_rules(text):
    with pytest.raises(ValueError, match="rule: "):
        parse_rule(text)


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
