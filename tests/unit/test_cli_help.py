"""Every `neuro-dask COMMAND --help` opens with what the command is and explains every argument."""

from __future__ import annotations

import argparse

import pytest

from neuro_dask.cli.main import build_parser, main


def _commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices.items())


@pytest.mark.parametrize("name,parser", _commands(), ids=[n for n, _ in _commands()])
def test_every_command_describes_itself_and_every_argument(name, parser):
    assert parser.description and parser.description[0].isupper(), name
    undocumented = [
        a.dest
        for a in parser._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help
    ]
    assert not undocumented, f"neuro-dask {name}: no help for {undocumented}"


def test_the_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name, _ in _commands())
