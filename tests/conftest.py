import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def run_stopped_after(plan, run_dir, step: int) -> int:
    """Run the recipe in-process and stop it as SIGTERM would once step ``step`` is done (it then
    checkpoints and exits); returns its exit code (130)."""
    from runner.recipe import Recipe

    holder = {}

    def stop(ev):
        if ev.get("type") == "step" and ev["step"] == step:
            holder["r"].stop_requested = "SIGTERM"

    holder["r"] = Recipe(plan, run_dir, log=lambda m: None, progress=stop)
    return holder["r"].run()
