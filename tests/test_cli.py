"""The CLI is a table of real functions (cm3dmm.cli.COMMANDS): each workflow rule runs the command
the table names for it, each command's output folder comes from RunPaths, bad arguments of the
fitting commands are one line with exit status 2."""

import re
from pathlib import Path

import pytest
import yaml

from cm3dmm import cli
from cm3dmm.paths import RunPaths

REPO = Path(__file__).resolve().parents[1]
_RULE = re.compile(r"^(?:rule|checkpoint) (\w+):\n(.*?)(?=^\S|\Z)", re.M | re.S)


def _rules() -> dict[str, str]:
    """rule name -> the cm3dmm command its shell runs (rules that run one)."""
    out = {}
    for path in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for rule, body in _RULE.findall(path.read_text()):
            m = re.search(r"python3 -m cm3dmm ([\w-]+)", body)
            if m:
                out[rule] = m.group(1)
    return out


def test_every_rule_runs_the_command_of_its_name():
    rules = _rules()
    assert len(rules) >= 14, rules
    for rule, command in rules.items():
        assert command in cli.COMMANDS, (rule, command)
        assert cli.COMMANDS[command].rule == rule, (rule, command)
    named = {c.rule for c in cli.COMMANDS.values() if c.rule}
    assert named == set(rules), named ^ set(rules)
    # rule x_y runs `cm3dmm x-y`, but for the data and cache stages' older command names
    renamed = {"prepare_data": "prepare", "cache_samples": "cache"}
    for rule, command in rules.items():
        assert command == renamed.get(rule, rule.replace("_", "-")), (rule, command)


def test_commands_are_functions_and_write_run_folders(tmp_path):
    source = Path(cli.__file__).read_text()
    assert "importlib" not in source and "import_module" not in source  # no dispatch through strings
    paths = RunPaths.of(tmp_path)
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in cli.COMMANDS.items():
        assert callable(command.run) and command.run.__module__ == "cm3dmm.cli", name
        assert name in sub.choices, name
        if command.writes is not None:
            assert command.writes(paths).parent == tmp_path, name


@pytest.mark.parametrize("argv,expect", [
    (["fit-size", "--variant", "pca_dimx"], "unknown fit variant 'pca_dimx'"),
    (["fit-upsampling", "--method", "pca", "--fraction", "half"], "--fraction: expected a number"),
    (["fit-upsampling", "--method", "nurbs", "--fraction", "0.5"], "--method: expected cm3dmm, pca or bilinear"),
])
def test_bad_fitting_arguments_are_one_line(tmp_path, capsys, argv, expect):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run": "r", "results": str(tmp_path / "results")}))
    assert cli.main([argv[0], "--config", str(cfg), *argv[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
