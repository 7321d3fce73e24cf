"""events.jsonl writing/tailing, the memory monitor without a GPU, and light imports."""

import json
import subprocess
import sys

from conftest import ROOT

from runner.events import EventWriter, read_events


def test_events_are_json_lines_and_tail_skips_a_half_line(tmp_path):
    with EventWriter(tmp_path) as ev:
        ev.emit("start", total_steps=3)
        ev.emit("step", step=1, loss=float("nan") if False else 2.5)
    events, off = read_events(tmp_path)
    assert [e["type"] for e in events] == ["start", "step"] and all("time" in e for e in events)
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"type": "step", "st')  # a writer killed mid-line
    more, off2 = read_events(tmp_path, off)
    assert more == [] and off2 == off
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('ep": 2}\n')
    more, off3 = read_events(tmp_path, off2)
    assert more == [{"type": "step", "step": 2}] and off3 > off2
    assert read_events(tmp_path / "missing") == ([], 0)


def test_monitor_without_gpu_samples_rss():
    from runner.monitor import MemoryMonitor, gpu_snapshot, sample, system_memory

    m = sample()
    assert m["rss"] > 0 and set(m) == {"torch_allocated", "torch_reserved", "torch_peak", "nvml_used", "rss"}
    sysmem = system_memory()
    assert sysmem["total"] >= sysmem["available"] > 0
    seen = []
    mon = MemoryMonitor(0.05, on_sample=seen.append)
    mon.start()
    import time

    time.sleep(0.3)
    mon.stop()
    assert seen and mon.peak["rss"] >= m["rss"] * 0.5
    if gpu_snapshot() is None:
        assert mon.note and "RSS" in mon.note


def test_light_modules_do_not_import_torch():
    code = ("import runner.events, runner.monitor, runner.launch, runner.commands, runner.api, runner.data\n"
            "import runner.recipe\n"
            "from runner.monitor import gpu_snapshot, system_memory\n"
            "gpu_snapshot(); system_memory()\n"
            "import sys; print(json.dumps(sorted(m for m in ('torch', 'transformers', 'peft', 'textual') "
            "if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout) == []
