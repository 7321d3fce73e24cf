"""Checkpoints: ``RUN_DIR/checkpoints/step-N/``, written whole or not at all, loaded without running code.

A checkpoint is written into ``checkpoints/.tmp-step-N-PID/`` and renamed to ``step-N`` when every
file is in it (``os.replace``: atomic on one file system), so a run killed at any moment leaves
either a complete checkpoint or a temporary folder that :func:`clean_partial` removes later. Only
the newest ``keep`` checkpoints stay. Files::

    step-N/adapter/ or model/   the trainable weights (save_pretrained: safetensors)
    step-N/optimizer.pt         optimizer.state_dict() (tensors and plain values only)
    step-N/scheduler.json       the learning-rate scheduler's state_dict()
    step-N/rng.json             Python's and numpy's generator states
    step-N/rng.safetensors      torch's CPU (and CUDA) generator states
    step-N/state.json           step, data position, losses, what the run was trained with

Run directories get shared and downloaded, so loading one must never execute code: weights come
from safetensors, JSON is JSON, and the only pickle (``optimizer.pt``) goes through
:func:`safe_torch_load`, torch's weights-only unpickler, which builds tensors, numbers, strings and
containers and refuses everything else. Anything a checkpoint cannot deliver raises
:class:`CheckpointError` with the file and what to do.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
TMP_PREFIX = ".tmp-step-"
# Plan fields a checkpoint's weights and optimizer state depend on: resuming cannot change them.
IDENTITY = ("model.ref", "training.method", "training.precision", "training.optimizer", "training.lora.r",
            "training.lora.targets", "training.lora.alpha")


class CheckpointError(ValueError):
    """A checkpoint that cannot, or must not, be loaded (damaged, foreign, or holding code)."""


# --- finding ---------------------------------------------------------------------------------

def step_of(d: Path) -> int | None:
    """N for a ``step-N`` folder name, else None."""
    name = d.name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (a renamed step-N folder holding state.json), or None."""
    root = Path(run_dir) / CHECKPOINTS
    best: tuple[int, Path] | None = None
    if root.is_dir():
        for d in root.iterdir():
            n = step_of(d)
            if n is not None and (d / STATE_FILE).is_file() and (best is None or n > best[0]):
                best = (n, d)
    return best[1] if best else None


def read_state(ck: Path) -> dict[str, Any]:
    """state.json of a checkpoint (step, position, ...); CheckpointError when it is not that."""
    path = Path(ck) / STATE_FILE
    try:
        st = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ck} is damaged: {path.name} cannot be read ({type(e).__name__}); "
                              "delete that checkpoint folder to resume from the one before it") from None
    if not isinstance(st, dict) or not isinstance(st.get("step"), int) or not isinstance(st.get("position"), int):
        raise CheckpointError(f"checkpoint {ck} is damaged: {path.name} has no step and position; delete that "
                              "checkpoint folder to resume from the one before it")
    return st


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_partial(run_dir: str | Path) -> list[Path]:
    """Remove half-written checkpoint folders (``.tmp-step-N-PID``) whose writer is gone; the removed ones."""
    root = Path(run_dir) / CHECKPOINTS
    removed = []
    if root.is_dir():
        for d in root.iterdir():
            if not d.name.startswith(TMP_PREFIX):
                continue
            pid = d.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


# --- the one safe loader -----------------------------------------------------------------------

def safe_torch_load(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)``: tensors, numbers, strings and containers, never code.

    A pickle that asks for anything else (a function to call, a class to build) is refused with a
    CheckpointError naming the file; nothing from it runs."""
    import pickle

    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds more than tensors and plain values, so it is not loaded (loading it "
                              "could run code planted in it); it was not written by tuneplan, or it was changed "
                              "since; delete that checkpoint folder or resume from a trusted copy") from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              "delete that checkpoint folder to resume from the one before it") from None


def load_weights(d: Path) -> dict:
    """The tensors of a save_pretrained folder: its safetensors files (``.bin`` only weights-only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(Path(d).glob("*.safetensors"))
    state: dict = {}
    if not files:
        bins = sorted(Path(d).glob("*.bin"))
        if not bins:
            raise CheckpointError(f"{d} holds no weights (*.safetensors); delete that checkpoint folder to "
                                  "resume from the one before it")
        for f in bins:
            state.update(safe_torch_load(f, map_location="cpu"))
        return state
    for f in files:
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f} is not a readable safetensors file ({str(e).splitlines()[0][:200]}); "
                                  "delete that checkpoint folder to resume from the one before it") from None
    return state


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({type(e).__name__}); delete that checkpoint folder "
                              "to resume from the one before it") from None


# --- generator states ------------------------------------------------------------------------

def rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """(JSON part: Python and numpy generators, tensor part: torch CPU and CUDA generators)."""
    import torch

    version, internal, gauss = random.getstate()
    plain: dict[str, Any] = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        plain["numpy"] = [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return plain, tensors


def set_rng_state(plain: dict[str, Any], tensors: dict[str, Any]) -> None:
    import torch

    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if "numpy" in plain:
        import numpy as np

        name, keys, pos, has_gauss, cached = plain["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# --- writing ---------------------------------------------------------------------------------

def write_checkpoint(run_dir: str | Path, step: int, *, model, optimizer, scheduler, state: dict[str, Any],
                     keep: int, weights_name: str, state_dict: dict | None = None) -> Path:
    """checkpoints/step-``step`` with every file above, written to a temporary folder and renamed.

    ``weights_name`` is ``adapter`` (PEFT) or ``model``; ``state_dict`` the gathered weights under
    FSDP / ZeRO-3 (None: the model's own). Keeps the newest ``keep`` checkpoints."""
    import torch
    from safetensors.torch import save_file

    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f"{TMP_PREFIX}{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(tmp / weights_name, state_dict=state_dict)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()), encoding="utf-8")
    plain, tensors = rng_state()
    (tmp / "rng.json").write_text(json.dumps(plain), encoding="utf-8")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "rng.safetensors")
    (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "time": time.time()}, indent=1),
                                  encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    done = sorted((d for d in root.iterdir() if step_of(d) is not None), key=lambda d: step_of(d) or 0)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


# --- reading ---------------------------------------------------------------------------------

def load_checkpoint(ck: str | Path, *, model, optimizer, scheduler, is_peft: bool, device: Any = "cpu") -> dict:
    """Put checkpoint ``ck`` into the model, optimizer, scheduler and generators; its state.json.

    Nothing in ``ck`` can run code (see the module doc); a damaged or foreign file raises
    CheckpointError before the generators are touched."""
    from safetensors.torch import load_file

    ck = Path(ck)
    st = read_state(ck)
    weights = load_weights(ck / ("adapter" if is_peft else "model"))
    optim = safe_torch_load(ck / "optimizer.pt", map_location=device)
    sched = _read_json(ck / "scheduler.json")
    plain = _read_json(ck / "rng.json")
    try:
        tensors = load_file(ck / "rng.safetensors")
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a bad file
        raise CheckpointError(f"{ck / 'rng.safetensors'} is not a readable safetensors file "
                              f"({type(e).__name__}); delete that checkpoint folder to resume from the one "
                              "before it") from None
    if not isinstance(sched, dict) or not isinstance(plain, dict) or "python" not in plain or "torch" not in tensors:
        raise CheckpointError(f"checkpoint {ck} is damaged (scheduler or generator state missing); delete that "
                              "checkpoint folder to resume from the one before it")
    try:
        if is_peft:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, weights)
        else:
            _, unexpected = model.load_state_dict(weights, strict=False)
            if unexpected:
                raise CheckpointError(f"checkpoint {ck} does not match the model ({len(unexpected)} unexpected "
                                      "weights)")
        optimizer.load_state_dict(optim)
        scheduler.load_state_dict(sched)
        set_rng_state(plain, tensors)
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"checkpoint {ck} does not match this model and plan ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    return st


def identity(plan_json: dict[str, Any]) -> dict[str, Any]:
    """The plan fields (IDENTITY) a checkpoint depends on, from ``plan.model_dump(mode='json')``."""
    out = {}
    for key in IDENTITY:
        node: Any = plan_json
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out
