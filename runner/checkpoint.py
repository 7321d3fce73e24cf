"""Checkpoints: ``RUN_DIR/checkpoints/step-N/``, written whole or not at all, loaded without running code.

A checkpoint is written into ``checkpoints/.tmp-step-N-PID/``, ``state.json`` last, flushed to the
disk (``fsync``) and renamed to ``step-N`` (``os.replace``: atomic on one file system), and the rename
is flushed too, so a run killed at any moment (SIGKILL, power loss) leaves either a complete
checkpoint or a temporary folder. A complete step-N is never deleted before its replacement is in
place (it is renamed aside to ``.old-step-N-PID`` first), and :func:`clean_partial` promotes a dead
writer's complete temporary copy (it holds ``state.json``) when no ``step-N`` exists, and removes
only the incomplete ones. Only the newest ``keep`` checkpoints stay. Files::

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

from advisor.safefile import LinkRefused, fsync_dir, fsync_tree

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
TMP_PREFIX = ".tmp-step-"
OLD_PREFIX = ".old-step-"
# Plan fields a checkpoint's weights and optimizer state depend on: resuming cannot change them.
# (Not model.ref: a run directory and its model may move to another machine; another model's weights
# do not fit the checkpoint's and are refused when they are loaded.)
IDENTITY = ("training.method", "training.precision", "training.optimizer", "training.lora.r",
            "training.lora.targets", "training.lora.alpha")


class CheckpointError(ValueError):
    """A checkpoint that cannot, or must not, be loaded (damaged, foreign, or holding code).
    ``checkpoint``: the step-N folder at fault, when one is (the advice moves it aside)."""

    def __init__(self, message: str, checkpoint: str | Path | None = None):
        super().__init__(message)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None


def _checkpoint_of(path: Path) -> Path | None:
    """The step-N folder that ``path`` is in (or is), if any."""
    for p in (path, *path.parents):
        if step_of(p) is not None:
            return p
    return None


def damaged(path: str | Path, what: str) -> CheckpointError:
    """A CheckpointError for a file or folder of a checkpoint that cannot be used, advising to set that
    checkpoint aside (the resume then takes the one before it: runner.rundir.next_command says which)."""
    path = Path(path)
    ck = _checkpoint_of(path)
    where = f"checkpoint {ck}" if ck is not None else str(path)
    return CheckpointError(f"{where} cannot be used: {what}; set it aside to resume from the checkpoint before it",
                           ck)


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
        raise damaged(path, f"{path.name} cannot be read ({type(e).__name__})") from None
    if not isinstance(st, dict) or not _count(st.get("step")) or not _count(st.get("position")):
        raise damaged(path, f"{path.name} has no step and position")
    bad = [k for k in ("first_loss", "val_loss") if st.get(k) is not None and not _number(st[k])]
    history = st.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) and _count(h.get("step"))
                                               and (h.get("loss") is None or _number(h["loss"])) for h in history):
        bad.append("history")
    for k in ("micro_batch", "batches_per_epoch", "world_size", "total_steps", "grad_accum"):
        if st.get(k) is not None and not (_count(st[k]) and st[k] > 0):
            bad.append(k)
    if bad:
        raise damaged(path, f"{path.name} holds values of the wrong type ({', '.join(bad)})")
    return st


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftover_step(d: Path) -> int | None:
    """N for a dead writer's ``.tmp-step-N-PID`` or ``.old-step-N-PID`` folder, else None."""
    for prefix in (TMP_PREFIX, OLD_PREFIX):
        if d.name.startswith(prefix):
            n, _, pid = d.name[len(prefix):].partition("-")
            if n.isdigit() and pid.isdigit():
                return int(n)
    return None


def clean_partial(run_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """Tidy what writers that are gone left in checkpoints/: a complete copy (it holds state.json, which
    is written last) of a step that has no ``step-N`` is promoted to ``step-N`` (a run killed between
    renaming the old copy aside and the new one into place); every other leftover is removed.
    Returns (removed, promoted)."""
    root = Path(run_dir) / CHECKPOINTS
    removed: list[Path] = []
    promoted: list[Path] = []
    if not root.is_dir() or root.is_symlink():
        return removed, promoted
    leftovers = []
    for d in root.iterdir():
        if not d.name.startswith((TMP_PREFIX, OLD_PREFIX)):
            continue
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        leftovers.append(d)
    # the newest writer's complete copy first (a temporary copy is newer than the one renamed aside)
    leftovers.sort(key=lambda d: (not d.name.startswith(TMP_PREFIX), d.name))
    for d in leftovers:
        n = _leftover_step(d)
        final = root / f"step-{n}"
        if (n is not None and not d.is_symlink() and (d / STATE_FILE).is_file() and not final.exists()
                and not final.is_symlink()):
            os.replace(d, final)
            fsync_dir(root)
            promoted.append(final)
        else:
            if d.is_symlink():
                d.unlink()
            else:
                shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed, promoted


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
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):  # it asks for a callable: code, refused
            raise CheckpointError(f"{path} holds more than tensors and plain values, so it is not loaded (loading it "
                                  "could run code planted in it); it was not written by tuneplan, or it was changed "
                                  "since; set that checkpoint aside or resume from a trusted copy",
                                  _checkpoint_of(path)) from None
        raise damaged(path, f"{path.name} is damaged (not a readable torch file)") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file (a KeyError on a bad record)
        first = (str(e).splitlines() or [""])[0][:200]
        raise damaged(path, f"{path.name} is damaged ({type(e).__name__}{': ' + first if first else ''})") from None


def load_weights(d: Path) -> dict:
    """The tensors of a save_pretrained folder: its safetensors files (``.bin`` only weights-only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(Path(d).glob("*.safetensors"))
    state: dict = {}
    if not files:
        bins = sorted(Path(d).glob("*.bin"))
        if not bins:
            raise damaged(d, f"{Path(d).name}/ holds no weights (*.safetensors)")
        for f in bins:
            state.update(safe_torch_load(f, map_location="cpu"))
        return state
    for f in files:
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise damaged(f, f"{f.name} is not a readable safetensors file ({str(e).splitlines()[0][:200]})") from None
    return state


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise damaged(path, f"{path.name} is not readable JSON ({type(e).__name__})") from None


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
                     before_rename: Callable[[Path], None] | None = None, durable: bool = True) -> Path:
    """checkpoints/step-``step`` with every file above, written to a temporary folder and renamed.

    ``weights_name`` is ``adapter`` (PEFT) or ``model``; ``state_dict`` the gathered weights under
    FSDP / ZeRO-3 (None: the model's own). Keeps the newest ``keep`` checkpoints. ``before_rename(tmp)``
    adds to the folder before it becomes the checkpoint (the other ranks' states: adopt_rank_states).
    ``durable``: fsync every file and the renames (docs/runner.md has the measured cost)."""
    from safetensors.torch import save_file

    root = own_dir(Path(run_dir) / CHECKPOINTS)
    final = root / f"step-{step}"
    if final.is_symlink():
        raise LinkRefused(0, "is a symbolic link; tuneplan never writes through one", str(final))
    tmp = fresh_dir(root / f"{TMP_PREFIX}{step}-{os.getpid()}")
    model.save_pretrained(tmp / weights_name, state_dict=state_dict)
    save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()), encoding="utf-8")
    plain, tensors = rng_state()
    (tmp / "rng.json").write_text(json.dumps(plain), encoding="utf-8")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "rng.safetensors")
    if before_rename is not None:
        before_rename(tmp)
    # state.json last: a folder holding it is complete (clean_partial promotes such a copy)
    (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "time": time.time()}, indent=1),
                                  encoding="utf-8")
    if durable:
        fsync_tree(tmp)
    replace_dir(tmp, final, aside=root / f"{OLD_PREFIX}{step}-{os.getpid()}", durable=durable)
    done = sorted((d for d in root.iterdir() if step_of(d) is not None), key=lambda d: step_of(d) or 0)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_torch(obj: Any, path: Path) -> None:
    """torch.save, with a full disk said as such: torch's zip writer reports a failed write as an
    internal error ("[enforce fail at inline_container.cc] unexpected pos ...", "file write failed")
    without the errno, so the file system is asked how much room is left."""
    import errno

    import torch

    try:
        torch.save(obj, path)
    except RuntimeError as e:
        if "inline_container" not in str(e) and "PytorchStreamWriter" not in str(e):
            raise
        try:
            st = os.statvfs(path.parent)
            full = st.f_bavail * st.f_frsize < (1 << 20)
        except OSError:
            full = False
        if full:
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from e
        raise


def own_dir(d: Path) -> Path:
    """``d`` created if missing, refused (LinkRefused) when it is a symbolic link."""
    if d.is_symlink():
        raise LinkRefused(0, "is a symbolic link; tuneplan never writes through one", str(d))
    d.mkdir(parents=True, exist_ok=True)
    return d


def fresh_dir(d: Path) -> Path:
    """An empty folder at ``d``: a leftover there (a link: only the link) is removed first."""
    if d.is_symlink():
        d.unlink()
    elif d.exists():
        shutil.rmtree(d)
    d.mkdir()
    return d


def replace_dir(new: Path, final: Path, *, aside: Path, durable: bool = True) -> None:
    """Rename the complete folder ``new`` to ``final``. An existing ``final`` is renamed to ``aside``
    first and deleted only once ``new`` is in its place, so no moment is without a complete copy."""
    if final.exists():
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
        os.replace(new, final)
        if durable:
            fsync_dir(final.parent)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(new, final)
        if durable:
            fsync_dir(final.parent)


# --- reading ---------------------------------------------------------------------------------

def load_checkpoint(ck: str | Path, *, model, optimizer, scheduler, is_peft: bool, device: Any = "cpu",
                    rank: int = 0, world: int = 1, stateful: bool = True, sharded: bool = False) -> dict:
    """Put checkpoint ``ck`` into the model, optimizer, scheduler and generators; its state.json.
    Process ``rank`` of ``world`` gets its own optimizer state and generators (ranks/rank-K/) when the
    checkpoint was written by as many processes; else rank 0's (the recipe notes the change).

    What it loads is checked against what the model and optimizer expect before anything is used:
    every weight of the model's adapter (or of the model) present with its shape, nothing foreign,
    optimizer states shaped like their parameters, and an optimizer that keeps state (``stateful``)
    holding some. ``sharded`` (FSDP, DeepSpeed): the model's own names and shapes are its shards', so
    only what the loaders themselves report is checked. Nothing in ``ck`` can run code (see the module
    doc); a damaged or foreign file raises CheckpointError before the generators are touched."""
    from safetensors.torch import load_file

    ck = Path(ck)
    st = read_state(ck)
    weights = load_weights(ck / ("adapter" if is_peft else "model"))
    if not weights:
        raise damaged(ck, f"its {'adapter' if is_peft else 'model'}/ holds no weights")
    own = rank_dir(ck, rank) if rank and st.get("world_size", 1) == world else ck
    # accelerate's CPU device reads "cpu:0" under torchrun, a location torch.load does not restore to
    optim = safe_torch_load(own / "optimizer.pt", map_location="cpu" if str(device).startswith("cpu") else device)
    sched = _read_json(ck / "scheduler.json")
    plain = _read_json(own / "rng.json")
    try:
        tensors = load_file(own / "rng.safetensors")
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a bad file
        raise damaged(own / "rng.safetensors", f"rng.safetensors is not a readable safetensors file "
                      f"({type(e).__name__})") from None
    if not isinstance(sched, dict) or not isinstance(plain, dict) or "python" not in plain or "torch" not in tensors:
        raise damaged(ck, "its scheduler or generator state is missing")
    if not isinstance(optim, dict) or not isinstance(optim.get("state"), dict) or \
            not isinstance(optim.get("param_groups"), list):
        raise damaged(own / "optimizer.pt", "optimizer.pt holds no optimizer state_dict")
    if not sharded:
        _check_weights(ck, model, weights, is_peft)
    try:
        if is_peft:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(model, weights)
            unexpected = list(getattr(result, "unexpected_keys", []) or [])
        else:
            _, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected:
            raise _mismatch(ck, f"{len(unexpected)} of its weights are not in this model (e.g. {unexpected[0]})")
        optimizer.load_state_dict(optim)
        if not sharded:
            _check_optimizer(ck, optimizer, stateful, st["step"])
        scheduler.load_state_dict(sched)
        set_rng_state(plain, tensors)
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        raise _mismatch(ck, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
    return st


def _mismatch(ck: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {ck} does not match this model and plan ({what}); resume with the model and "
                           "plan it was trained with, or set that checkpoint aside to resume from the one before it",
                           ck)


def _check_weights(ck: Path, model, weights: dict, is_peft: bool) -> None:
    """Every weight the model's adapter (PEFT) or the model itself holds is in ``weights`` with its shape,
    and ``weights`` holds nothing else (a tied weight, saved once, counts as present)."""
    if is_peft:
        from peft import get_peft_model_state_dict

        expected = get_peft_model_state_dict(model)
    else:
        expected = model.state_dict()
    present = {t.data_ptr() for k, t in expected.items() if k in weights and t.numel()}
    missing = [k for k, t in expected.items() if k not in weights and not (t.numel() and t.data_ptr() in present)]
    foreign = [k for k in weights if k not in expected]
    wrong = [k for k in weights if k in expected and tuple(weights[k].shape) != tuple(expected[k].shape)]
    what = "adapter weights" if is_peft else "weights"
    if missing:
        raise _mismatch(ck, f"{len(missing)} of the model's {len(expected)} {what} are missing from it "
                            f"(e.g. {missing[0]})")
    if foreign:
        raise _mismatch(ck, f"{len(foreign)} of its {what} are not in this model (e.g. {foreign[0]})")
    if wrong:
        k = wrong[0]
        raise _mismatch(ck, f"{len(wrong)} {what} have another shape (e.g. {k}: {tuple(weights[k].shape)} in the "
                            f"checkpoint, {tuple(expected[k].shape)} in the model)")


# state tensors that have one value per parameter value (AdamW's moments, SGD's momentum, bitsandbytes' 8-bit states)
_PER_VALUE_STATES = ("exp_avg", "exp_avg_sq", "momentum_buffer", "state1", "state2")


def _check_optimizer(ck: Path, optimizer, stateful: bool, step: int) -> None:
    """The loaded optimizer state against the parameters: per-value states shaped like their
    parameter, and some state at all when the optimizer keeps any and steps were taken."""
    import torch

    params = [p for g in optimizer.param_groups for p in g["params"]]
    with_state = 0
    for i, p in enumerate(params):
        state = optimizer.state.get(p) or {}
        with_state += bool(state)
        for key in _PER_VALUE_STATES:
            v = state.get(key)
            if torch.is_tensor(v) and v.numel() != p.numel():
                raise _mismatch(ck, f"the optimizer's {key} of parameter {i} has {v.numel():,} values, the "
                                    f"parameter {p.numel():,}")
    if stateful and step > 0 and params and not with_state:
        raise damaged(ck / "optimizer.pt", f"optimizer.pt holds no state for any of the {len(params)} trained "
                      f"parameters after {step} steps")


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
    from safetensors.torch import save_file

    final = rank_stage(run_dir, step) / f"rank-{rank}"
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
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
