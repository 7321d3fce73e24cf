"""The model a run made, opened and loaded the way the runner trained it (chat, eval and export read it).

:func:`open_run` reads a run directory without loading anything: its plan.yaml, which weights it
holds (``adapter/`` for LoRA and QLoRA, ``model/`` for full fine-tuning, ``merged/`` when the plan
merged, or ``checkpoints/step-N/...``), and the data format and prompt template the run trained with
(its ``start`` event; else the data file). Every reason it cannot be used is one
:class:`advisor.problems.UserError` line that says what to do.

:func:`load_models` then loads them. An adapter goes onto the base exactly as the runner built it:
:func:`advisor.stack.load_for_training` (the plan's dtype, NF4 with its compute dtype for QLoRA,
``prepare_model_for_kbit_training``'s fp32 casts, peft's LoRA layers) and the adapter's tensors
loaded into it as a resume loads a checkpoint (:func:`runner.checkpoint.load_weights`: safetensors,
never a pickle). The base's replies come from the same model with the adapter switched off
(``PeftModel.disable_adapter``), so base and tuned share every weight but the adapter's. A full
fine-tune's ``model/`` (or ``merged/``) loads with ``use_safetensors=True`` beside a base loaded in
the same dtype.

Nothing in a run directory runs code: custom modelling code only when the plan says
``model.trust_remote_code: true`` *and* the user passes ``--trust-remote-code``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advisor.problems import UserError

KINDS = ("adapter", "model", "merged")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class TunedRun:
    """What a run directory offers after training (read only; nothing loaded yet)."""

    run_dir: Path
    plan: Any  # advisor.spec.Plan
    weights: Path  # the folder with the tuned weights
    kind: str  # "adapter" (LoRA/QLoRA), "model" (full fine-tune) or "merged"
    label: str  # how to name the weights to the user: "adapter/", "checkpoints/step-100/adapter"
    trust_remote_code: bool = False
    data_format: str | None = None  # the record shape the run trained on (alpaca, messages, ...)
    template: str | None = None  # the prompt template it used (alpaca, chat, plain)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.plan.training.method

    @property
    def precision(self) -> str:
        return self.plan.training.precision

    def base_dir(self) -> Path:
        """The base model directory the run trained from; UserError when it is gone."""
        from runner.modeldir import ModelLoadError, find_model_dir, looks_local

        ref = self.plan.model.ref
        try:
            return find_model_dir(ref, self.plan.model.revision)
        except ModelLoadError as e:
            if looks_local(ref) and not Path(ref).expanduser().exists():
                raise UserError(f"the base model directory {ref} this run trained from no longer exists "
                                f"(model.ref in {self.run_dir / 'plan.yaml'}); put it back there, or edit "
                                "model.ref to where it is now") from None
            raise UserError(f"cannot use the run's base model: {e}") from None

    def resolved_template(self, tokenizer) -> str | None:
        """The template the run used: from its start event, else as runner.data resolves the plan's."""
        if self.template or self.data_format is None:
            return self.template
        from runner.data import DataError, resolve_template

        try:
            return resolve_template(self.data_format, self.plan.data.template, tokenizer)
        except DataError as e:
            raise UserError(e.problems[0]) from None

    def tokenizer_dir(self) -> Path:
        """The run's own tokenizer (saved beside its final weights), else the base's."""
        if (self.weights / "tokenizer_config.json").is_file():
            return self.weights
        return self.base_dir()


# --- opening a run directory (nothing loaded) ---------------------------------------------------

def open_run(run_dir: str | Path, *, checkpoint: str | None = None, merged: bool = False,
             trust_remote_code: bool = False) -> TunedRun:
    """The run in ``run_dir`` and the weights to load: the final ones, ``merged/`` when ``merged``,
    or ``checkpoints/<checkpoint>`` ("step-N" or "N"). UserError (one line) when they cannot be used."""
    from advisor.planfile import load_plan
    from advisor.spec import SpecError

    d = Path(run_dir)
    if not d.exists():
        raise UserError(f"run directory {d} does not exist; give the folder `tuneplan run` printed as "
                        "'run directory:'")
    if not d.is_dir():
        raise UserError(f"{d} is a file, not a run directory; give the folder `tuneplan run` printed as "
                        "'run directory:'")
    plan_path = d / "plan.yaml"
    if not plan_path.is_file():
        raise UserError(f"{d} has no plan.yaml, so it is not a run directory (`tuneplan run` writes one into "
                        "every run); give the folder it printed as 'run directory:'")
    if plan_path.is_symlink() or not plan_path.is_file():
        raise UserError(f"{plan_path} is not a regular file; a run's plan.yaml is one (tuneplan writes it)")
    try:  # a plan that allows custom code needs the command's --trust-remote-code (advisor.planfile.consent)
        plan = load_plan(plan_path, trust_remote_code)
    except SpecError as e:
        raise UserError(f"{plan_path} cannot be used: {e.items[0]}") from None
    if plan.task != "training":
        raise UserError(f"{plan_path} is an inference plan (task: inference); only a training run has "
                        "tuned weights")
    weights, kind, label = _find_weights(d, plan, checkpoint, merged)
    fmt, template = _data_shape(d, plan)
    return TunedRun(d, plan, weights, kind, label, trust_remote_code=plan.model.trust_remote_code,
                    data_format=fmt, template=template, report=_read_report(d))


def _find_weights(d: Path, plan, checkpoint: str | None, merged: bool) -> tuple[Path, str, str]:
    from runner.checkpoint import CHECKPOINTS, STATE_FILE, latest_checkpoint, step_of

    peft = plan.training.method in ("lora", "qlora")
    name = "adapter" if peft else "model"
    if checkpoint is not None:
        if merged:
            raise UserError("--merged and --checkpoint exclude each other: a checkpoint holds no merged model")
        step = checkpoint.removeprefix("step-")
        ck = d / CHECKPOINTS / f"step-{step}"
        if not step.isdigit() or not (ck / STATE_FILE).is_file():
            have = sorted((c.name for c in (d / CHECKPOINTS).iterdir() if step_of(c) is not None
                           and (c / STATE_FILE).is_file()), key=lambda n: int(n[5:])) \
                if (d / CHECKPOINTS).is_dir() else []
            raise UserError(f"{d} has no checkpoint {checkpoint!r}; "
                            + (f"it has {', '.join(have)}" if have else "it has no checkpoint at all"))
        w = ck / name
        _check_weights(w, name, f"checkpoints/{ck.name}/{name}", d)
        return w, name, f"checkpoints/{ck.name}/{name}"
    if merged:
        w = d / "merged"
        if not (w / "config.json").is_file():
            raise UserError(f"{d} has no merged/ model (the plan did not set run.merge_export: true); drop "
                            "--merged to load the adapter, or write one with `tuneplan export`")
        _check_weights(w, "merged", "merged/", d)
        return w, "merged", "merged/"
    w = d / name
    if not w.exists():
        _not_finished(d, name, latest_checkpoint(d))
    _check_weights(w, name, f"{name}/", d)
    return w, name, f"{name}/"


def _not_finished(d: Path, name: str, ck: Path | None) -> None:
    from runner.rundir import holder

    owner = holder(d)
    use_ck = f"--checkpoint {ck.name}" if ck is not None else None
    if owner is not None:
        who = f" (PID {owner['pid']})" if owner.get("pid") else ""
        raise UserError(f"the run in {d} is still training{who} and has no {name}/ yet; wait for it to end"
                        + (f", or use its newest checkpoint with {use_ck}" if use_ck else ""))
    if ck is not None:
        raise UserError(f"{d} has no {name}/: the run did not finish; resume it with `tuneplan run --resume {d}`, "
                        f"or use its newest checkpoint with {use_ck}")
    raise UserError(f"{d} has no {name}/ and no checkpoint: the run stopped before it saved anything; start it "
                    f"again with `tuneplan run {d / 'plan.yaml'} --run-dir {d}`")


def _check_weights(w: Path, kind: str, label: str, d: Path) -> None:
    """The folder holds what loads without running code: safetensors weights (and the adapter's config)."""
    if w.is_symlink() or not w.is_dir():
        raise UserError(f"{d}/{label} is not a folder; it is damaged (re-run, or use --checkpoint step-N)")
    if kind == "adapter":
        if not (w / ADAPTER_CONFIG).is_file():
            raise UserError(f"{d}/{label} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter; it is incomplete "
                            "(use another checkpoint with --checkpoint step-N, or train again)")
        if not (w / ADAPTER_WEIGHTS).is_file():
            pickled = (w / "adapter_model.bin").is_file()
            raise UserError(f"{d}/{label} has no {ADAPTER_WEIGHTS}"
                            + (" (only a pickled adapter_model.bin, which tuneplan does not load: it could run "
                               "code; convert it to safetensors where you trust it)" if pickled else
                               "; the adapter is incomplete (use another checkpoint with --checkpoint step-N, or "
                               "train again)"))
    elif not any(w.glob("*.safetensors")):
        raise UserError(f"{d}/{label} holds no *.safetensors weights (tuneplan loads no pickled weights: they "
                        "could run code); it is incomplete or was written by another tool")


def _data_shape(d: Path, plan) -> tuple[str | None, str | None]:
    """(format, template) the run trained with: from its last ``start`` event, else from the data file."""
    found: tuple[str | None, str | None] = (None, None)
    try:
        with open(d / "events.jsonl", "rb") as fh:
            for raw in fh:
                if b'"start"' not in raw:
                    continue
                try:
                    ev = json.loads(raw)
                except ValueError:
                    continue
                data = ev.get("data") if isinstance(ev, dict) and ev.get("type") == "start" else None
                if isinstance(data, dict) and isinstance(data.get("format"), str):
                    found = (data["format"], data.get("template"))
    except OSError:
        pass
    if found[0]:
        return found
    fmt = plan.data.format if plan.data.format != "auto" else None
    if fmt is None and plan.data.path and Path(plan.data.path).is_file():
        from runner.data import DataError, load_and_check

        try:
            fmt = load_and_check(plan.data.path, "auto")[1] or None
        except DataError:
            fmt = None
    return fmt, None


def _read_report(d: Path) -> dict[str, Any]:
    try:
        rep = json.loads((d / "report.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return rep if isinstance(rep, dict) else {}


# --- loading ------------------------------------------------------------------------------------

def pick_device(run: TunedRun, device: str = "auto") -> str:
    """"cuda:0" when asked (or, for "auto", when the run trained on CUDA and a GPU is here), else "cpu"."""
    import torch

    if device == "cpu":
        return "cpu"
    if device in ("cuda", "auto") and torch.cuda.is_available():
        if device == "cuda" or run.plan.hardware.device == "cuda":
            return "cuda:0"
    if device == "cuda":
        raise UserError("--device cuda: no CUDA GPU is visible here; use --device cpu")
    return "cpu"


def _inference_spec(run: TunedRun, device: str):
    """The plan's training spec for an inference load: no checkpointing hooks, an attention kernel this
    device has (flash_attention_2 needs CUDA)."""
    t = run.plan.training
    upd: dict[str, Any] = {"grad_checkpointing": False}
    if t.attn_impl == "flash_attention_2" and device == "cpu":
        upd["attn_impl"] = "sdpa"
    return t.model_copy(update=upd)


def no_cpu_repack(model) -> None:
    """bitsandbytes (CPU with AVX512-BF16) repacks a 4-bit weight into a CPU-only layout the first time it
    runs in eval mode, and that fails for dimensions that are not a multiple of 128 (the demo's 352);
    the runner switches it off for its evaluation, and so does everything here."""
    for mod in model.modules():
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False


def _quiet():
    """No "Loading weights" bars; bitsandbytes' note about its optional CPU kernels stays out of the output."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)  # as the runner: peft's deprecation notes


def _load_error(what: str, e: Exception) -> UserError:
    return UserError(f"cannot load {what}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")


def load_adapter_model(run: TunedRun, device: str = "cpu"):
    """The base as the runner trained it (advisor.stack.load_for_training) with the run's adapter tensors
    in its LoRA layers; a ``PeftModel`` in eval mode. UserError when the adapter does not fit the plan."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from advisor.stack import load_for_training
    from runner.checkpoint import CheckpointError, load_weights

    _quiet()
    base_dir = run.base_dir()
    spec = _inference_spec(run, device)
    shard_4bit = spec.method == "qlora" and run.plan.hardware.gpus > 1 and run.plan.hardware.zero == 3
    try:
        model = load_for_training(base_dir, spec, device=device, trust_remote_code=run.trust_remote_code,
                                  fsdp=shard_4bit)
    except Exception as e:  # noqa: BLE001 - damaged weights, a config transformers rejects, a missing library
        raise _load_error(f"the base model {base_dir} for {spec.method}", e) from None
    try:
        weights = load_weights(run.weights)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    expected = set(get_peft_model_state_dict(model))
    given = set(weights)
    if given != expected:
        raise UserError(f"{run.run_dir}/{run.label} does not match the plan's LoRA settings "
                        f"({len(given - expected)} unexpected and {len(expected - given)} missing adapter "
                        "tensors); was plan.yaml edited after the run?")
    try:
        set_peft_model_state_dict(model, {k: v.to(device) for k, v in weights.items()})
    except (RuntimeError, ValueError) as e:
        raise _load_error(f"{run.run_dir}/{run.label} into the base", e) from None
    return _ready(model)


def load_plain_model(path: Path, dtype, device: str, *, attn_impl: str, trust_remote_code: bool,
                     what: str, safetensors_only: bool = True):
    """``AutoModelForCausalLM.from_pretrained`` for inference (safetensors only for a run's own folders)."""
    from transformers import AutoModelForCausalLM

    _quiet()
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_impl,
                              "trust_remote_code": trust_remote_code}
    if safetensors_only:
        kwargs["use_safetensors"] = True
    if device != "cpu":
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise _load_error(what, e) from None
    return _ready(model)


def _ready(model):
    no_cpu_repack(model)
    model.eval()
    model.config.use_cache = True
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_tokenizer(run: TunedRun):
    from transformers import AutoTokenizer

    src = run.tokenizer_dir()
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=run.trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise _load_error(f"the tokenizer in {src}", e) from None
    if tok.pad_token_id is None:  # as the runner does
        tok.pad_token = tok.eos_token
    return tok


class Models:
    """The tuned model, the base beside it (on demand) and the run's tokenizer, on one device.

    ``use("tuned")`` / ``use("base")`` is a context manager giving the model to run: for an adapter the
    same PeftModel, with the adapter switched off for the base; for a full fine-tune or merged/ a base
    loaded in the same dtype the first time it is asked for."""

    def __init__(self, run: TunedRun, device: str = "cpu"):
        from advisor.stack import compute_dtype, param_dtype

        self.run = run
        self.device = device
        self.tokenizer = load_tokenizer(run)
        attn = _inference_spec(run, device).attn_impl
        self._attn = attn
        if run.kind == "adapter":
            self.tuned = load_adapter_model(run, device)
            self.dtype = param_dtype(run.precision)
        else:
            # model/ holds the trained weights in the parameter dtype; merged/ was saved in the compute dtype
            self.dtype = param_dtype(run.precision) if run.kind == "model" else compute_dtype(run.precision)
            self.tuned = load_plain_model(run.weights, self.dtype, device, attn_impl=attn,
                                          trust_remote_code=run.trust_remote_code,
                                          what=f"{run.run_dir}/{run.label}")
        self._base = None

    @property
    def shares_base(self) -> bool:
        """Base and tuned are one model (the adapter switched on and off)."""
        return self.run.kind == "adapter"

    def base_model(self):
        if self.shares_base:
            return self.tuned
        if self._base is None:
            d = self.run.base_dir()
            self._base = load_plain_model(d, self.dtype, self.device, attn_impl=self._attn,
                                          trust_remote_code=self.run.trust_remote_code,
                                          what=f"the base model {d}", safetensors_only=False)
        return self._base

    @contextlib.contextmanager
    def use(self, which: str = "tuned"):
        if which not in ("tuned", "base"):
            raise ValueError(f"which must be 'tuned' or 'base', not {which!r}")
        if which == "tuned":
            yield self.tuned
        elif self.shares_base:
            with self.tuned.disable_adapter():
                yield self.tuned
        else:
            yield self.base_model()

    def weights_bytes(self) -> int:
        """Bytes of the loaded parameters and buffers (both models when the base is a model of its own)."""
        total = _footprint(self.tuned)
        if self._base is not None:
            total += _footprint(self._base)
        return total

    def autocast(self):
        from advisor.stack import autocast

        return autocast(self.run.precision, "cuda" if self.device.startswith("cuda") else "cpu")


def _footprint(model) -> int:
    seen: set[int] = set()
    n = 0
    for t in [*model.parameters(), *model.buffers()]:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            n += st.nbytes()
    return n


def load_models(run: TunedRun, device: str = "auto") -> Models:
    """:class:`Models` for ``run`` on ``device`` ("auto": see :func:`pick_device`)."""
    return Models(run, pick_device(run, device))


def memory_now(device: str) -> dict[str, int | None]:
    """{rss, rss_peak, cuda_peak} in bytes (None where not available) for the stats lines."""
    import resource
    import sys

    import psutil

    rss = int(psutil.Process().memory_info().rss)
    out: dict[str, int | None] = {"rss": rss, "cuda_peak": None,  # ru_maxrss is in KiB on Linux
                                  "rss_peak": max(rss, int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024)}
    torch = sys.modules.get("torch")
    if torch is not None and device.startswith("cuda") and torch.cuda.is_available():
        out["cuda_peak"] = int(torch.cuda.max_memory_allocated())
    return out
