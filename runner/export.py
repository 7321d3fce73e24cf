"""`tuneplan export RUN_DIR`: a standalone model directory from a run -- base + adapter merged -- and a 4-bit copy.

What it writes (``--out DIR``, default ``RUN_DIR-export`` beside the run directory)::

    DIR/                 the merged model in --dtype (default: the run's compute dtype), safetensors,
                         with the run's tokenizer and the chat template it trained with
    DIR/tuneplan-export.json   where it came from (run, weights, dtype, template)
    DIR-nf4/             with --4bit: the same model quantized by bitsandbytes (NF4, double
                         quantization); ``from_pretrained(DIR-nf4)`` loads it 4-bit

The merge is :func:`runner.saving.merge_export`'s: the base reloaded in the chosen dtype (never in
4-bit: merging into NF4 would round the update away, and the QLoRA run's base was NF4 only to
train), ``PeftModel.from_pretrained`` with the run's adapter, ``merge_and_unload``. Each directory is
written to a temporary folder beside it and renamed when whole. Before anything is loaded the host
RAM and the disk it needs are checked (:func:`advisor.lifecycle.merge_parts`, the measured model of
that merge) and the time is said; an export that does not fit is refused with one message.
Nothing of the run is written, no existing non-empty folder, nothing through a symbolic link.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from advisor.problems import Problems, UserError
from advisor.spec import INFER_PRECISIONS
from advisor.units import gib_str
from runner.rundir import is_inside
from runner.tuned import TunedRun, load_tokenizer

DTYPES: tuple[str, ...] = INFER_PRECISIONS  # the weights dtypes (advisor.spec)
INFO_FILE = "tuneplan-export.json"
NF4_SUFFIX = "-nf4"
# What the time estimate assumes (measured on this project's 2-core CPU machine, see docs/after-the-run.md):
# a fixed start (imports, tokenizer) plus bytes of weights read and written per second.
START_S = 7.0
BYTES_PER_S = 200 * 1024**2
NF4_BYTES_PER_S = 100 * 1024**2  # quantizing on the CPU: per byte of the merged weights
DISK_MARGIN = 64 * 1024**2  # tokenizer, config, safetensors headers


@dataclass
class ExportPlan:
    """What an export will do and need, checked before it starts."""

    run: TunedRun
    out: Path
    nf4_out: Path | None
    dtype: str
    params: int
    ram_bytes: int  # host RAM the merge needs (advisor.lifecycle.merge_parts)
    ram_free: int
    disk_bytes: int  # what the written folders take
    disk_free: int
    seconds: float  # rough
    ram_parts: dict[str, int]

    def words(self) -> list[str]:
        out = [f"export {self.run.run_dir}/{self.run.label} -> {self.out} ({self.dtype}"
               + (f"; 4-bit copy -> {self.nf4_out})" if self.nf4_out else ")"),
               f"needs {_size(self.ram_bytes)} of RAM ({_size(self.ram_free)} free; "
               + ", ".join(f"{k} {_size(v)}" for k, v in self.ram_parts.items() if v) + ") and "
               f"{_size(self.disk_bytes)} of disk ({_size(self.disk_free)} free)",
               f"takes about {_duration(self.seconds)} (a rough guide: disk and CPU speed decide)"]
        if self.ram_bytes > 0.85 * self.ram_free:
            out.append("RAM is tight: measured up to 14% above this estimate when the base is stored in a wider "
                       "dtype than --dtype (benchmarks/bench_export.py); close other programs first")
        return out


def _size(b: int) -> str:
    return gib_str(b) if b >= 1024**3 / 4 else f"{b / 1024**2:,.1f} MiB"


def _duration(s: float) -> str:
    if s < 90:
        return f"{max(5, round(s / 5) * 5):.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def default_dtype(run: TunedRun) -> str:
    """The run's compute dtype: what its merged/ would hold."""
    return run.precision.removeprefix("amp-").removeprefix("mixed-")


def default_out(run: TunedRun) -> Path:
    return run.run_dir.parent / f"{run.run_dir.name}-export"


# --- checks -----------------------------------------------------------------------------------

def check_out(out: Path, run: TunedRun, base_dir: Path | None, flag: str = "--out") -> None:
    """UserError when ``out`` must not be written: a link, a file, a folder with something in it, one of the
    run's own files, or the base model's folder."""
    from runner.rundir import ATTEMPTS, EVENTS_FILE, LOCK_FILE, RUN_NAMES

    if out.is_symlink():
        raise UserError(f"{flag} {out} is a symbolic link; tuneplan writes nothing through a link: give a real "
                        "folder")
    full = out.resolve()
    run_dir = run.run_dir.resolve()
    if full == run_dir:
        raise UserError(f"{flag} {out} is the run directory itself; give a new folder")
    for name in (*RUN_NAMES, EVENTS_FILE, LOCK_FILE, ATTEMPTS):
        if is_inside(full, run_dir / name):
            raise UserError(f"{flag} {out} is inside the run's own {name}; give a folder outside the run's files")
    if base_dir is not None and is_inside(full, base_dir.resolve()):
        raise UserError(f"{flag} {out} is inside the base model directory {base_dir}; give another folder")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"{flag} {out} is a file; give a new or empty folder")
        if any(out.iterdir()):
            raise UserError(f"{flag} {out} exists and is not empty; give a new or empty folder (nothing is "
                            "overwritten)")
    p = full
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: {p} is not a writable folder")


def _existing(p: Path) -> Path:
    p = p.resolve()
    while not p.exists():
        p = p.parent
    return p


def _shape(run: TunedRun, src: Path):
    from advisor.service import model_shape

    try:
        return model_shape(str(src), trust_remote_code=run.trust_remote_code)
    except Problems as e:  # an architecture the advisor cannot shape, a broken config
        raise UserError(f"cannot size the export: the advisor cannot read the model in {src} "
                        f"({e.items[0].what.splitlines()[0][:200]})") from None


def plan_export(run: TunedRun, out: str | Path | None = None, dtype: str | None = None,
                nf4: bool = False) -> ExportPlan:
    """Every check before an export (UserError), and what it needs: RAM, disk, time."""
    import psutil

    from advisor.service import export_bytes

    if run.kind == "merged":
        raise UserError("export merges the adapter itself: drop --merged (merged/ is already a merged model)")
    dtype = dtype or default_dtype(run)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    base_dir = run.base_dir() if run.kind == "adapter" else None
    out_p = Path(out) if out is not None else default_out(run)
    check_out(out_p, run, base_dir)
    nf4_out = out_p.with_name(out_p.name + NF4_SUFFIX) if nf4 else None
    if nf4_out is not None:
        check_out(nf4_out, run, base_dir, flag="the 4-bit copy's folder")
    shape = _shape(run, base_dir or run.weights)
    # an adapter: the merge moment (advisor.lifecycle); a full fine-tune: its model/ reloaded in the dtype.
    # The 4-bit copy is built in the same process after the merge; measured (benchmarks/bench_export.py):
    # the allocator keeps much of the merge's freed memory, so the 4-bit model counts on top of it
    need = export_bytes(run.plan, shape, dtype, nf4, merge=run.kind == "adapter")
    parts = need["ram"]
    merged_bytes = need["merged"]
    disk = merged_bytes + DISK_MARGIN
    nf4_disk = need["nf4_model"] + DISK_MARGIN if nf4 else 0
    ram = sum(parts.values())
    ram_free = int(psutil.virtual_memory().available)
    dev_out, dev_nf4 = os.stat(_existing(out_p)).st_dev, os.stat(_existing(nf4_out or out_p)).st_dev
    free = shutil.disk_usage(_existing(out_p)).free
    need_here = disk + (nf4_disk if dev_nf4 == dev_out else 0)
    read_bytes = _weights_file_bytes(base_dir or run.weights)
    seconds = START_S + (read_bytes + merged_bytes) / BYTES_PER_S
    if nf4:
        seconds += (merged_bytes + nf4_disk) / BYTES_PER_S + merged_bytes / NF4_BYTES_PER_S
    xp = ExportPlan(run, out_p, nf4_out, dtype, shape.params_total, ram, ram_free, disk + nf4_disk,
                    free, seconds, parts)
    if ram > ram_free:
        raise UserError(f"the export needs about {_size(ram)} of free RAM ("
                        + ", ".join(f"{k} {_size(v)}" for k, v in parts.items() if v) + f") and {_size(ram_free)} "
                        "is available; close other programs, or export on a machine with more RAM")
    if need_here > free:
        raise UserError(f"the export needs about {_size(need_here)} of disk at {_existing(out_p)} and "
                        f"{_size(free)} is free; free some space or give --out on another disk")
    if nf4_out is not None and dev_nf4 != dev_out and nf4_disk > shutil.disk_usage(_existing(nf4_out)).free:
        raise UserError(f"the 4-bit copy needs about {_size(nf4_disk)} of disk at {_existing(nf4_out)}, more "
                        "than is free there")
    return xp


def _weights_file_bytes(d: Path) -> int:
    return sum(f.stat().st_size for pat in ("*.safetensors", "*.bin") for f in Path(d).glob(pat))


# --- the export -------------------------------------------------------------------------------

def export(xp: ExportPlan, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write ``xp.out`` (and ``xp.nf4_out``); what was written."""
    import torch

    say = progress or (lambda msg: None)
    run = xp.run
    t0 = time.time()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[xp.dtype]
    tok = load_tokenizer(run)
    from runner.prompts import chat_template_for

    template, template_words = chat_template_for(run.data_format, run.resolved_template(tok), tok)
    if template is not None:
        tok.chat_template = template
    info = {"run_dir": str(run.run_dir.resolve()), "weights": run.label, "method": run.method,
            "base": str(run.base_dir()) if run.kind == "adapter" else None, "dtype": xp.dtype,
            "chat_template": template_words, "data_format": run.data_format, "template": run.template}
    say(f"loading {'the base and the adapter' if run.kind == 'adapter' else run.label} in {xp.dtype}")
    model = _merged_model(run, dtype)
    _write_dir(xp.out, partial(_save, model, tok, {**info, "quantization": None}), say)
    del model
    _release()
    written = {"merged": str(xp.out)}
    if xp.nf4_out is not None:
        say(f"quantizing to 4-bit (bitsandbytes NF4) -> {xp.nf4_out}")
        q = _nf4_model(xp.out, dtype, run.trust_remote_code)
        _write_dir(xp.nf4_out, partial(_save, q, tok, {**info, "quantization": "bitsandbytes nf4, double "
                                                                             "quantization"}), say)
        del q
        _release()
        written["nf4"] = str(xp.nf4_out)
    return {**written, "seconds": round(time.time() - t0, 1), "chat_template": template_words}


def _release() -> None:
    """Free the last model's memory and hand it back to the system (glibc keeps freed heap memory of
    mid-sized tensors otherwise, and the 4-bit step would come on top of it)."""
    import ctypes
    import ctypes.util

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass


def _merged_model(run: TunedRun, dtype):
    from runner.tuned import _load_error, _quiet

    _quiet()
    from transformers import AutoModelForCausalLM

    if run.kind == "model":
        try:
            return AutoModelForCausalLM.from_pretrained(run.weights, dtype=dtype, use_safetensors=True,
                                                        trust_remote_code=run.trust_remote_code)
        except Exception as e:  # noqa: BLE001
            raise _load_error(f"{run.run_dir}/{run.label}", e) from None
    from peft import PeftModel

    base_dir = run.base_dir()
    try:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, trust_remote_code=run.trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise _load_error(f"the base model {base_dir}", e) from None
    try:
        return PeftModel.from_pretrained(base, run.weights).merge_and_unload()
    except Exception as e:  # noqa: BLE001 - an adapter that does not fit this base
        raise _load_error(f"{run.run_dir}/{run.label} onto {base_dir}", e) from None


def _nf4_model(merged_dir: Path, dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype, quantization_config=q,
                                                use_safetensors=True, trust_remote_code=trust_remote_code)


def _save(model, tok, info: dict, tmp: Path) -> None:
    model.save_pretrained(tmp)  # safetensors
    tok.save_pretrained(tmp)
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _write_dir(out: Path, write: Callable[[Path], None], say: Callable[[str], None]) -> None:
    """``write(tmp)`` into a new folder beside ``out``, then rename it to ``out`` (an empty ``out`` is replaced)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        raise UserError(f"{tmp} is in the way (left by an export that died?); remove it and run again")
    tmp.mkdir()
    try:
        write(tmp)
        if out.is_dir() and not out.is_symlink():
            out.rmdir()  # checked empty before; fails (and keeps it) if something appeared since
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wrote {out}")
