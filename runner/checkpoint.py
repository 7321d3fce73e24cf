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
    step-N/ranks/rank-K/        every other process's optimizer.pt and generators (several processes)

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
TMP_PREFIX = ".tmp-step-"
# Plan fields a checkpoint's weights and optimizer state depend on: resuming cannot change them.
# (Not model.ref: a run directory and its model may move to another machine; another model's weights
# do not fit the checkpoint's and are refused when they are loaded.)
IDENTITY = ("training.method", "training.precision", "training.optimizer", "training.lora.r",
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
                     keep: int, weights_name: str, state_dict: dict | None = None,
                     before_rename: Callable[[Path], None] | None = None) -> Path:
    """checkpoints/step-``step`` with every file above, written to a temporary folder and renamed.

    ``weights_name`` is ``adapter`` (PEFT) or ``model``; ``state_dict`` the gathered weights under
    FSDP / ZeRO-3 (None: the model's own). Keeps the newest ``keep`` checkpoints. ``before_rename(tmp)``
    adds to the folder before it becomes the checkpoint (the other ranks' states: adopt_rank_states)."""
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
    if before_rename is not None:
        before_rename(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    done = sorted((d for d in root.iterdir() if step_of(d) is not None), key=lambda d: step_of(d) or 0)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


# --- reading ---------------------------------------------------------------------------------

def load_checkpoint(ck: str | Path, *, model, optimizer, scheduler, is_peft: bool, device: Any = "cpu",
                    rank: int = 0, world: int = 1) -> dict:
    """Put checkpoint ``ck`` into the model, optimizer, scheduler and generators; its state.json.
    Process ``rank`` of ``world`` gets its own optimizer state and generators (ranks/rank-K/) when the
    checkpoint was written by as many processes; else rank 0's (the recipe notes the change).

    Nothing in ``ck`` can run code (see the module doc); a damaged or foreign file raises
    CheckpointError before the generators are touched."""
    from safetensors.torch import load_file

    ck = Path(ck)
    st = read_state(ck)
    weights = load_weights(ck / ("adapter" if is_peft else "model"))
    own = rank_dir(ck, rank) if rank and st.get("world_size", 1) == world else ck
    # accelerate's CPU device reads "cpu:0" under torchrun, a location torch.load does not restore to
    optim = safe_torch_load(own / "optimizer.pt", map_location="cpu" if str(device).startswith("cpu") else device)
    sched = _read_json(ck / "scheduler.json")
    plain = _read_json(own / "rng.json")
    try:
        tensors = load_file(own / "rng.safetensors")
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a bad file
        raise CheckpointError(f"{own / 'rng.safetensors'} is not a readable safetensors file "
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


# --- every rank ------------------------------------------------------------------------------
# Under several processes each one's optimizer state is its own (ZeRO and FSDP shard it; DDP keeps
# copies) and so are its generators. Ranks other than 0 write theirs to a staging folder
# (.tmp-step-N-ranks, which clean_partial removes if a run dies there); rank 0, after a barrier,
# moves it into its temporary checkpoint folder before the rename, so a checkpoint holds every rank
# or does not exist. Loading, each rank reads its own. One run directory must be shared by every
# node (a shared file system, a bucket mount).

RANKS = "ranks"


def rank_dir(ck: str | Path, rank: int) -> Path:
    """Where rank ``rank``'s optimizer.pt and generators are in checkpoint ``ck`` (rank 0: the top)."""
    ck = Path(ck)
    if rank == 0:
        return ck
    d = ck / RANKS / f"rank-{rank}"
    if not (d / "optimizer.pt").is_file():
        raise CheckpointError(f"checkpoint {ck} holds no state for process {rank} (it was written by fewer "
                              "processes, or this node does not see the run directory node 0 wrote); resume with "
                              "the same hardware.gpus, on a run directory every node shares")
    return d


def rank_stage(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{TMP_PREFIX}{step}-{RANKS}"


def write_rank_state(run_dir: str | Path, step: int, rank: int, optimizer) -> Path:
    """Rank ``rank`` (> 0): its optimizer state and generators for the checkpoint of ``step``."""
    import torch
    from safetensors.torch import save_file

    final = rank_stage(run_dir, step) / f"rank-{rank}"
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    plain, tensors = rng_state()
    (tmp / "rng.json").write_text(json.dumps(plain), encoding="utf-8")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "rng.safetensors")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def adopt_rank_states(run_dir: str | Path, step: int, world: int) -> Callable[[Path], None]:
    """write_checkpoint's before_rename for ``world`` processes: move ranks 1..world-1 into the
    checkpoint; CheckpointError (and no checkpoint) when one is missing."""
    def adopt(tmp: Path) -> None:
        stage = rank_stage(run_dir, step)
        missing = [k for k in range(1, world) if not (stage / f"rank-{k}" / "optimizer.pt").is_file()]
        if missing:
            raise CheckpointError(f"processes {missing} wrote no state for the checkpoint of step {step} into "
                                  f"{stage}; every node must share the run directory")
        (tmp / RANKS).mkdir()
        for k in range(1, world):
            os.replace(stage / f"rank-{k}", tmp / RANKS / f"rank-{k}")
        shutil.rmtree(stage, ignore_errors=True)

    return adopt


def identity(plan_json: dict[str, Any]) -> dict[str, Any]:
    """The plan fields (IDENTITY) a checkpoint depends on, from ``plan.model_dump(mode='json')``."""
    out = {}
    for key in IDENTITY:
        node: Any = plan_json
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out
