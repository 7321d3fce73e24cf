"""Every `--json` prints exactly one JSON object on stdout: the result, or, for a user mistake, {"problems": [...]}
(docs/cli.md). One case per command that has --json, found in the real parser, in the success and the error case."""

from __future__ import annotations

import argparse
import json

import pytest

from advisor.cli.main import build_parser, main
from runner.demo import DEMO_DATA

MODEL = "Qwen/Qwen2.5-0.5B"


def json_commands() -> set[str]:
    """'estimate', 'data check', ...: every command of the real parser with a --json flag."""
    found = set()

    def walk(p: argparse.ArgumentParser, prefix: str) -> None:
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    walk(sub, f"{prefix} {name}".strip())
            elif "--json" in a.option_strings:
                found.add(prefix)

    walk(build_parser(), "")
    return found


def _bad_data(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{bad\n{"instruction": "c"}\n')
    return str(f)


def _bad_gpu_file(tmp_path, monkeypatch):
    f = tmp_path / "gpus.yaml"
    f.write_text("gpus: [{id: x}]\n")
    monkeypatch.setenv("TUNEPLAN_GPUS", str(f))


# (command, argv, expected exit codes, key the object must have); argv may be a function of (tmp_path, monkeypatch)
SUCCESS = [
    ("estimate", ["estimate", MODEL, "--gpu", "rtx-4090", "--max", "seq"], {0}, "peak_reserved_bytes"),
    ("recommend", ["recommend", MODEL, "--gpu", "rtx-4090"], {0, 1}, "options"),
    ("profiles", ["profiles"], {0}, "profiles"),
    ("profiles --gpus", ["profiles", "--gpus"], {0}, "gpus"),
    ("guide", ["guide", "--gap", "knowledge", "--changes-often", "--cite"], {0}, "verdict"),
    ("data check", ["data", "check", str(DEMO_DATA)], {0}, "valid_records"),
    # the file's problems are the object's "problems" list (it was a second object), exit code 2
    ("data check", lambda tmp, mp: ["data", "check", _bad_data(tmp)], {2}, "valid_records"),
]
ERRORS = [
    ("estimate", ["estimate", MODEL, "--gpu", "2x a100", "--batch", "0"]),
    ("recommend", ["recommend", MODEL, "--gpu", "8xH100", "--methods", "nonsense"]),
    ("profiles --gpus", lambda tmp, mp: (_bad_gpu_file(tmp, mp), ["profiles", "--gpus"])[1]),
    ("guide", ["guide", "--examples", "-1"]),
    ("data check", lambda tmp, mp: ["data", "check", str(tmp / "absent.jsonl")]),
    ("eval", lambda tmp, mp: ["eval", str(tmp)]),  # not a run directory (success: tests/test_after_run.py)
]
SUCCESS_ELSEWHERE = {"eval"}  # needs a trained run: tests/test_after_run.py parses its --json as one object
NO_ERROR_CASE = {"profiles"}  # it reads only the bundled profiles: nothing a user gives can be wrong


def one_object(capsys) -> dict:
    out = capsys.readouterr().out
    obj = json.loads(out)  # "Extra data" when a second object follows
    assert isinstance(obj, dict), out[:200]
    return obj


def test_every_command_with_json_is_covered():
    commands = json_commands()
    assert commands >= {"estimate", "recommend", "profiles", "guide", "data check", "eval"}
    assert {c.split(" --")[0] for c, *_ in SUCCESS} | SUCCESS_ELSEWHERE == commands
    assert {c.split(" --")[0] for c, _ in ERRORS} | NO_ERROR_CASE == commands


@pytest.mark.parametrize("command, argv, codes, key", SUCCESS, ids=[f"{c}-{i}" for i, (c, *_) in enumerate(SUCCESS)])
def test_json_is_one_object(command, argv, codes, key, tmp_path, monkeypatch, capsys):
    argv = argv(tmp_path, monkeypatch) if callable(argv) else argv
    assert main([*argv, "--json"]) in codes
    obj = one_object(capsys)
    assert key in obj
    if command == "data check":
        assert isinstance(obj["problems"], list)
        assert all(isinstance(p, dict) and p["message"] for p in obj["problems"])
        if 2 in codes:
            assert [p["message"][:6] for p in obj["problems"]] == ["line 2", "line 3"]


@pytest.mark.parametrize("command, argv", ERRORS, ids=[c for c, _ in ERRORS])
def test_json_problems_are_one_object(command, argv, tmp_path, monkeypatch, capsys):
    argv = argv(tmp_path, monkeypatch) if callable(argv) else argv
    assert main([*argv, "--json"]) == 2
    obj = one_object(capsys)
    assert list(obj) == ["problems"] and obj["problems"]
    assert all(p["message"] and "field" in p for p in obj["problems"])
    if command == "estimate":  # every problem at once: the counted GPU name and the batch
        assert {p["field"] for p in obj["problems"]} >= {"hardware.gpu", "training.micro_batch"}


def test_profiles_json_has_what_the_table_shows(capsys):
    assert main(["profiles", "--json"]) == 0
    rows = {r["name"]: r for r in one_object(capsys)["profiles"]}
    assert rows[MODEL]["params_total"] > 4e8 and rows[MODEL]["type"] == "qwen2"
    assert main(["profiles", "--gpus", "--json"]) == 0
    gpus = {g["id"]: g for g in one_object(capsys)["gpus"]}
    assert gpus["rtx-4090"]["memory_bytes"] == int(gpus["rtx-4090"]["memory_gib"] * 1024**3)
    assert "a100" in gpus["a100-80gb-sxm"]["aliases"]
