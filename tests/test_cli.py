import subprocess
import sys

import pytest

from longctx.cli import COMMAND_MODULES, build_parser, main

COMMANDS = ["plan", "extend", "train", "extract-lora", "merge-adapters", "needle", "ppl"]


def test_every_command_is_registered():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert sorted(subparsers.choices) == sorted(COMMANDS)
    assert len(COMMAND_MODULES) == len(COMMANDS)


def test_a_missing_command_module_is_an_error(monkeypatch):
    monkeypatch.setattr("longctx.cli.COMMAND_MODULES", [*COMMAND_MODULES, "longctx.commands.no_such_command"])
    with pytest.raises(ModuleNotFoundError, match="no_such_command"):
        build_parser()


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_explains_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: longctx " + command in text
    assert "example" in text.lower()


def test_console_scripts_run():
    out = subprocess.run([sys.executable, "-m", "longctx", "--help"], capture_output=True, text=True, check=True).stdout
    for command in COMMANDS:
        assert command in out
    assert subprocess.run([sys.executable, "-m", "longctx"], capture_output=True).returncode == 2


def test_help_imports_no_torch():
    code = "import sys; from longctx.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
