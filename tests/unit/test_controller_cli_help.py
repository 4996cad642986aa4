"""`ibc controller --help` states every default, taken from the parser itself (so it cannot drift)."""

import argparse

import pytest

from ibc.__main__ import build_parser

pytestmark = pytest.mark.unit


def _controller() -> argparse.ArgumentParser:
    parser = build_parser("controller")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["controller"]


PARSER = _controller()
OPTIONS = [a for a in PARSER._actions if a.option_strings and a.dest != "help" and a.default is not False]


@pytest.mark.parametrize("action", OPTIONS, ids=lambda a: a.option_strings[-1])
def test_every_option_says_its_default(action):
    shown = " ".join(PARSER._get_formatter()._expand_help(action).split())
    assert "default" in shown, shown
    if action.default not in (None, ""):
        value = f"{action.default:g}" if isinstance(action.default, float) else str(action.default)
        assert f"default {value}" in shown, shown
