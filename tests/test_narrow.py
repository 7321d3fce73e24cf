"""Every table and line reads at 80 columns (rich reads COLUMNS): no line is wider, nothing is cut with '…',
no two distinct names render as the same text, and no number is broken over two lines."""

from __future__ import annotations

import json
import re

import pytest

from advisor.cli.main import main
from runner.demo import DEMO_DATA

WIDTH = 80


@pytest.fixture(autouse=True)
def eighty_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", str(WIDTH))


def render(capsys, argv, codes=(0,)) -> str:
    assert main(argv) in codes
    out = capsys.readouterr().out
    for line in out.splitlines():  # a command stays on one line, to be copied whole
        assert len(line) <= WIDTH or line.lstrip().startswith("tuneplan "), line
    assert "…" not in out, out
    return out


def as_json(capsys, argv, codes=(0,)) -> dict:
    assert main([*argv, "--json"]) in codes
    return json.loads(capsys.readouterr().out)


def words(text: str) -> str:
    return " ".join(text.split())


def first_column(out: str, header: str, next_header: str) -> list[str]:
    """The cells of a borderless table's first column, a cell wrapped over several lines joined again (a line
    whose first column is blank, or starts with a space, continues the cell above)."""
    lines = out.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith(header) and next_header in line)
    width = lines[top].index(next_header)
    cells: list[str] = []
    for line in lines[top + 1:]:
        if not line.strip():
            break
        cell = line[:width].rstrip()
        if cells and (not cell or cell.startswith(" ")):
            if cell:
                cells[-1] += cell.strip() if cells[-1].endswith("/") else " " + cell.strip()
        else:
            cells.append(cell)
    return cells


def test_profiles_names_read_apart(capsys):
    from advisor.catalog import bundled_profiles

    out = render(capsys, ["profiles"])
    names = first_column(out, "name", "type")
    assert names == list(bundled_profiles())  # every one whole, none collapsed into another
    rows = {r["name"]: r for r in as_json(capsys, ["profiles"])["profiles"]}
    for line in out.splitlines():
        name = line.split(" ", 1)[0]
        if name in rows:  # the numbers of a one-line row, whole
            assert f"{rows[name]['params_total'] / 1e9:.2f}B" in line and str(rows[name]["vocab"]) in line


def test_gpu_profiles_read_apart(capsys):
    out = render(capsys, ["profiles", "--gpus"])
    gpus = as_json(capsys, ["profiles", "--gpus"])["gpus"]
    assert first_column(out, "id", "name") == [g["id"] for g in gpus]
    lines = {line.split(" ", 1)[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    for g in gpus:
        line = lines[g["id"]]
        assert f"{g['memory_gib']:.1f} GiB" in line and f"{g['tflops']:g}" in line
    text = words(out)
    for g in gpus:  # a wrapped name, read back across its lines
        first, *rest = g["name"].split()
        assert first in text and all(w in text for w in rest)


@pytest.mark.slow
def test_estimate_reads_at_80_columns(capsys):
    argv = ["estimate", "meta-llama/Llama-3.1-8B", "--gpu", "a100", "--max", "seq"]
    out = render(capsys, argv)
    res = as_json(capsys, argv)
    from advisor.units import gib

    assert re.search(rf"peak reserved \(nvidia-smi\)\s.*{re.escape(gib(res['peak_reserved_bytes']))}", out)
    assert f"{res['max']['seq_len']['value']:,}" in out.split()
    assert words("\n".join(res["notes"])) in words(out) if res["notes"] else True


@pytest.mark.parametrize("argv", [
    ["recommend", "meta-llama/Llama-3.1-8B", "--seq", "4096"],  # every priced card: long GPU names
    ["recommend", "meta-llama/Llama-3.1-8B", "--gpu", "RTX 3060", "--seq", "4096"],  # options with a 'why'
    ["recommend", "Qwen/Qwen2.5-7B", "--gpu", "h100", "--budget", "0.01"],  # over budget
])
@pytest.mark.slow
def test_recommend_reads_at_80_columns(argv, capsys):
    from advisor.present import option_why, short_gpu
    from advisor.units import gib

    out = render(capsys, argv, codes=(0, 1))
    adv = as_json(capsys, argv, codes=(0, 1))
    lines = out.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("Options")):]
    shown = adv["options"][:20]
    for o in shown:  # the row's numbers whole on one line, in the table's order
        memory = f"{gib(o['peak_reserved_bytes'], 1)} / {gib(o['capacity_bytes'], 1)}"
        assert any(memory in line and line.startswith(o["method"]) for line in table), memory
    text = words("\n".join(table))
    for o in shown:
        assert all(w in text for w in short_gpu(o["gpu"]).split())

    class Option:  # option_why reads attributes
        def __init__(self, d):
            self.__dict__.update(d)

    for o in shown:
        why = option_why(Option(o))
        if why:
            assert words(why) in text, why


def test_guide_reads_at_80_columns(capsys):
    argv = ["guide", "--gap", "knowledge", "--changes-often", "--cite"]
    out = render(capsys, argv)
    g = as_json(capsys, argv)
    for line in (*g["reasons"], *g["next_steps"]):
        assert words(line) in words(out)


def test_data_check_reads_at_80_columns(capsys, tmp_path):
    out = render(capsys, ["data", "check", str(DEMO_DATA)])
    res = as_json(capsys, ["data", "check", str(DEMO_DATA)])
    assert f"{res['valid_records']} valid records" in words(out)
    s = res["characters"]
    assert f"min {s['min']}, mean {s['mean']}, max {s['max']}" in words(out)
