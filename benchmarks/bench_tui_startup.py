"""Time to first paint of the TUI (goal < 1.5 s), cold, as a new process.

A fresh interpreter imports the app, opens it headless on a 160x48 screen and stops at Textual's
Ready event (sent after the first frame is drawn); by then the plan screen must show the default
plan's estimate. The clock starts in the parent just before the process is spawned, so interpreter
start-up and every import count. Also checks that neither torch nor transformers was imported.

    .venv/bin/python benchmarks/bench_tui_startup.py [runs]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
from advisor.tui.app import TunePlanApp, make_app

class Bench(TunePlanApp):
    def on_ready(self) -> None:
        head = str(self.screen.query_one("#headline").content)
        self.exit({"t": time.time(), "headline": head,
                   "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules})

app = make_app()
app.__class__ = Bench
out = app.run(headless=True, size=(160, 48))
print(json.dumps(out))
"""


def once() -> dict:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["seconds"] = res.pop("t") - t0
    return res


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    results = [once() for _ in range(runs)]
    secs = [r["seconds"] for r in results]
    last = results[-1]
    assert "GiB reserved" in last["headline"], f"no estimate on screen at first paint: {last['headline']!r}"
    print(f"time to first paint (cold process, headless 160x48): median {statistics.median(secs):.3f} s, "
          f"min {min(secs):.3f} s, max {max(secs):.3f} s over {runs} runs (goal < 1.5 s)")
    print(f"first screen: {last['headline'].splitlines()[0]}")
    print(f"torch imported: {last['torch']}, transformers imported: {last['transformers']}")


if __name__ == "__main__":
    main()
