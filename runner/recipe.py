"""The training recipe: setup -> train -> cleanup, one visible loop.

``Recipe(plan, run_dir).run()`` is the whole run: it loads the model as :mod:`advisor.stack` does
(the same code the memory calibration measures), tokenizes the data (:mod:`runner.data`), trains
with :func:`advisor.stack.train_step`, and writes the run directory::

    RUN_DIR/plan.yaml            the resolved plan (no secrets)
    RUN_DIR/events.jsonl         start, step, memory, eval, checkpoint, end / error events
    RUN_DIR/report.json          predicted vs measured peak memory, runtime, losses
    RUN_DIR/checkpoints/step-N/  adapter or model, optimizer, scheduler, RNG, data position
    RUN_DIR/adapter/             final LoRA/QLoRA adapter (PEFT format; model/ for full fine-tuning)
    RUN_DIR/merged/              base + adapter merged (run.merge_export)

SIGTERM / Ctrl-C finish the current step, write a checkpoint and an ``end`` event with status
``interrupted``; ``Recipe(..., resume=True)`` continues from the newest checkpoint.
Under ``accelerate launch`` (several processes) rank 0 writes the run directory; the model is
wrapped by accelerate (DDP, FSDP or DeepSpeed as the generated config says).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from advisor.spec import Plan
from runner.events import EventWriter, clean_number

GIB = 1024**3
TEST_OOM_ENV = "TUNEPLAN_TEST_OOM_AT_STEP"  # test hook: raise torch.OutOfMemoryError at this step
TEST_DELAY_ENV = "TUNEPLAN_TEST_STEP_DELAY"  # test hook: sleep this many seconds after each step
EXIT_INTERRUPTED = 130
EXIT_FAILED = 1


class ModelLoadError(ValueError):
    """The model reference cannot be loaded for training (no weights, no such directory...)."""


class RunStopped(Exception):
    pass


def default_run_name(plan: Plan) -> str:
    ref = plan.model.ref.rstrip("/").replace("\\", "/")
    short = ref.split("/")[-1] or "model"
    short = "".join(c if c.isalnum() or c in "-_." else "-" for c in short)
    return f"{short}-{plan.training.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def default_run_dir(plan: Plan) -> Path:
    return Path(plan.run.output_dir) / (plan.run.name or default_run_name(plan))


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json", "*.bin.index.json")


def find_model_dir(ref: str, revision: str | None = None) -> Path:
    """A local directory with config.json and weights, or a hub id downloaded to the HF cache.

    The token (if the repository needs one) comes from the environment (HF_TOKEN), never the plan.
    """
    p = Path(ref).expanduser()
    if p.exists() or ref.startswith((".", "/", "~")):
        if p.is_file():
            raise ModelLoadError(f"model.ref {ref} is a file; training needs a model directory with config.json "
                                 "and weights (a config.json alone is enough for estimates only)")
        if not p.is_dir():
            raise ModelLoadError(f"model directory {ref} does not exist")
        if not (p / "config.json").exists():
            raise ModelLoadError(f"{ref} has no config.json; is it a transformers model directory?")
        if not any(any(p.glob(pat)) for pat in WEIGHT_PATTERNS):
            raise ModelLoadError(f"{ref} has a config.json but no weights (*.safetensors or *.bin); training "
                                 "needs the weights (download them or save_pretrained the model there)")
        return p
    if ref.count("/") != 1:
        raise ModelLoadError(f"model.ref {ref!r} is neither a local model directory nor a hub id (org/name); "
                             "bundled profiles hold no weights and cannot be trained")
    try:
        from huggingface_hub import HfApi, snapshot_download

        files = HfApi().list_repo_files(ref, revision=revision)
        weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
        path = snapshot_download(ref, revision=revision,
                                 allow_patterns=["*.json", "*.model", "*.txt", "*.jinja", "tokenizer*", *weights])
    except Exception as e:  # offline, gated, no such repo
        raise ModelLoadError(f"cannot download {ref} from the hub: {type(e).__name__}: {e}".splitlines()[0]) from None
    return find_model_dir(path)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (a renamed step-N directory holding state.json)."""
    root = Path(run_dir) / "checkpoints"
    best = None
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith("step-") and (d / "state.json").exists():
                try:
                    n = int(d.name[5:])
                except ValueError:
                    continue
                if best is None or n > best[0]:
                    best = (n, d)
    return best[1] if best else None


class Recipe:
    """One fine-tuning run of ``plan`` writing ``run_dir``. See the module doc."""

    def __init__(self, plan: Plan, run_dir: str | Path, *, resume: bool = False, command: list[str] | None = None,
                 progress: Callable[[dict], None] | None = None, log: Callable[[str], None] | None = None,
                 monitor_interval: float = 0.5, instrument: bool = True):
        self.plan = plan
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.command = command or sys.argv
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.monitor_interval = monitor_interval
        self.instrument = instrument  # False: no events file, no monitor thread (overhead benchmark only)
        self.tensor_peak_cpu: int | None = None  # CPU: live tensor bytes of one profiled step
        self.stop_requested: str | None = None
        self.step = 0
        self.position = 0  # micro-batches consumed (per process), the data position
        self.history: list[dict] = []
        self.val_loss: float | None = None
        self.first_loss: float | None = None
        self.events: EventWriter | None = None
        self.monitor = None
        self.accelerator = None
        self.rank, self.world = 0, 1
        self.predicted: dict[str, Any] = {"peak_allocated_bytes": None, "peak_reserved_bytes": None}
        self.notes: list[str] = []
        self.resumed_from: str | None = None
        self.t_start = time.time()

    # --- setup ----------------------------------------------------------------------------

    def setup(self) -> None:
        import warnings

        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress bar; no "Loading weights" bars in the log
        warnings.filterwarnings("ignore", category=FutureWarning)

        self.torch = torch
        plan, t = self.plan, self.plan.training
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=plan.hardware.device == "cpu")
            self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
            self.device = str(self.accelerator.device)
        else:
            self.device = "cuda:0" if plan.hardware.device == "cuda" else "cpu"
        self.is_main = self.rank == 0
        self.events = EventWriter(self.run_dir, enabled=self.is_main and self.instrument)
        from runner.monitor import MemoryMonitor

        self.monitor = MemoryMonitor(self.monitor_interval, on_sample=self._on_memory)
        if self.monitor.note:
            self.notes.append(self.monitor.note)
        if self.resume:
            ck = latest_checkpoint(self.run_dir)
            self.resumed_from = str(ck) if ck else None
        if self.is_main:  # the resolved plan (on resume: with that command's overrides, e.g. more steps)
            from advisor.planfile import save_plan

            save_plan(plan, self.run_dir / "plan.yaml")
        self._seed(plan.run.seed)

        self.model_dir = find_model_dir(plan.model.ref, plan.model.revision)
        self._predict()
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir,
                                                           trust_remote_code=self.plan.model.trust_remote_code)
        except Exception as e:
            raise ModelLoadError(f"cannot load the tokenizer from {self.model_dir}: {e}".splitlines()[0]) from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        from runner.data import prepare

        self.data = prepare(plan.data, self.tokenizer, t.seq_len, plan.run.seed)
        for w in self.data.warnings:
            self.log(f"warning: {w}")
        per_rank = len(self.data.train) // self.world
        if per_rank < 1:
            from runner.data import DataError

            raise DataError([f"{len(self.data.train)} training examples cannot feed {self.world} processes"])
        self.per_rank = per_rank
        self.batches_per_epoch = math.ceil(per_rank / t.micro_batch)
        if plan.run.max_steps:
            self.total_steps = plan.run.max_steps
        else:
            self.total_steps = max(1, math.ceil(plan.run.epochs * self.batches_per_epoch / t.grad_accum))

        start_step = 0
        if self.resumed_from:
            start_step = json.loads((Path(self.resumed_from) / "state.json").read_text())["step"]
        self.events.emit("start", run_dir=str(self.run_dir.resolve()), plan=plan.model_dump(mode="json"),
                         command=list(self.command), predicted=self.predicted, total_steps=self.total_steps,
                         device=self._device_words(), resumed_from=self.resumed_from, step=start_step,
                         world_size=self.world, data={"format": self.data.format, "template": self.data.template,
                                                      **self.data.stats})
        if self.is_main and self.instrument:
            self.monitor.start()  # memory events from here on: model loading included

        from advisor.stack import load_for_training, make_optimizer

        _preimport(t.method)  # library code pages are not the model: keep them out of the RSS baseline
        self.rss_before_model = self.monitor.read()["rss"]
        try:
            self.model = load_for_training(self.model_dir, t, device=self.device,
                                           trust_remote_code=self.plan.model.trust_remote_code)
        except (OSError, ValueError, ImportError, RuntimeError) as e:
            if _is_oom(e):
                raise
            raise ModelLoadError(f"cannot load {self.model_dir} for {t.method} training: "
                                 f"{type(e).__name__}: {e}".splitlines()[0]) from None
        self.is_peft = t.method in ("lora", "qlora")
        for mod in self.model.modules():
            # bitsandbytes (CPU, AVX512-BF16 machines) repacks a 4-bit weight into a CPU-only layout the
            # first time it runs in eval mode, and that repacking fails for dimensions that are not a
            # multiple of 128 (seen: 128 x 352). Training never takes that path; keep evaluation on it too.
            if hasattr(mod, "support_avx512bf16_for_cpu"):
                mod.support_avx512bf16_for_cpu = False
        if self.accelerator is not None and self._dist_type() != "DEEPSPEED":
            self.model = self.accelerator.prepare(self.model)
        self.optimizer = make_optimizer(self.model, t.optimizer, t.learning_rate)
        if self.accelerator is not None and self._dist_type() == "DEEPSPEED":
            # no dataloader goes through accelerate, so tell DeepSpeed the micro-batch itself
            self.accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = t.micro_batch
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        from transformers import get_scheduler

        name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[plan.run.lr_scheduler]
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=plan.run.warmup_steps,
                                       num_training_steps=self.total_steps)
        if self.resumed_from:
            self._load_checkpoint(Path(self.resumed_from))

    def _seed(self, seed: int) -> None:
        from transformers import set_seed

        set_seed(seed)

    def _dist_type(self) -> str:
        return str(getattr(self.accelerator.state.distributed_type, "value", self.accelerator.state.distributed_type))

    def _device_words(self) -> str:
        torch = self.torch
        if self.device.startswith("cuda"):
            name = torch.cuda.get_device_name(torch.device(self.device))
            return f"{name} x {self.world}" if self.world > 1 else name
        return f"cpu ({os.cpu_count()} cores)" + (f" x {self.world} processes" if self.world > 1 else "")

    def _predict(self) -> None:
        """The advisor's estimate for this plan: what the report compares the measurement with."""
        try:
            from advisor.memory import estimate
            from advisor.model import resolve

            self.shape = resolve(str(self.model_dir), trust_remote_code=self.plan.model.trust_remote_code)
            bd = estimate(self.plan, self.shape)
            self.predicted = {"peak_allocated_bytes": bd.peak_allocated_bytes,
                              "peak_reserved_bytes": bd.peak_reserved_bytes, "peak_phase": bd.peak_phase,
                              "device": self.plan.hardware.device}
        except Exception as e:  # an architecture the advisor cannot shape: train anyway, say so
            self.shape = None
            self.notes.append(f"no memory estimate for this model: {e}".splitlines()[0])

    def _on_memory(self, m: dict) -> None:
        if self.events is not None:
            self.events.emit("memory", memory=m)

    # --- data order -----------------------------------------------------------------------

    def _micro_batch(self, position: int) -> dict:
        """Micro-batch number ``position`` of this process's endless, epoch-shuffled stream."""
        from runner.data import collate

        t = self.plan.training
        epoch, k = divmod(position, self.batches_per_epoch)
        order = list(range(len(self.data.train)))
        random.Random(self.plan.run.seed * 1000003 + epoch).shuffle(order)
        mine = order[self.rank::self.world][: self.per_rank]
        idx = mine[k * t.micro_batch:(k + 1) * t.micro_batch]
        pad_to = t.seq_len if self.plan.data.pad_to == "seq_len" else None
        batch = collate([self.data.train[i] for i in idx], self.tokenizer.pad_token_id, pad_to)
        return {k2: v.to(self.device) for k2, v in batch.items()}

    # --- train ----------------------------------------------------------------------------

    def train(self) -> str:
        from advisor.stack import train_step

        torch = self.torch
        plan, t = self.plan, self.plan.training
        oom_at = int(os.environ.get(TEST_OOM_ENV, "0") or 0)
        delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
        backward = clip = None
        if self.accelerator is not None:
            backward = self.accelerator.backward
            if self._dist_type() == "FSDP":
                clip = self.accelerator.clip_grad_norm_
            elif self._dist_type() == "DEEPSPEED":
                clip = lambda params, max_norm: None  # noqa: E731 - the engine clips (gradient_clipping)
        session_start_step, t0, cpu0 = self.step, time.time(), time.process_time()
        tokens_session = 0
        while self.step < self.total_steps:
            if self._should_stop():
                raise RunStopped(self.stop_requested or "SIGTERM")
            micro = [self._micro_batch(self.position + i) for i in range(t.grad_accum)]
            tokens = int(sum(int(b["attention_mask"].sum()) for b in micro)) * self.world
            if oom_at and self.step + 1 == oom_at:
                # Test hook (CPU): what a CUDA allocator failure raises, at a known step.
                raise torch.OutOfMemoryError(f"simulated by {TEST_OOM_ENV}={oom_at}: CUDA out of memory. "
                                             "Tried to allocate 2.00 GiB")
            stats: dict[str, Any] = {}
            step_args = (self.model, micro, self.optimizer, t, plan.run.max_grad_norm)
            step_kwargs = {"backward": backward, "clip_grad": clip, "stats": stats}
            if self._profile_this_step():
                loss = self._profiled_step(train_step, step_args, step_kwargs)
            else:
                loss = train_step(*step_args, **step_kwargs)
            self.scheduler.step()
            self.position += t.grad_accum
            self.step += 1
            tokens_session += tokens
            loss_v = self._mean_across(float(loss))
            if self.first_loss is None:
                self.first_loss = loss_v
            elapsed = time.time() - t0
            done = self.step - session_start_step
            eta = elapsed / done * (self.total_steps - self.step)
            lr = self.scheduler.get_last_lr()[0]
            mem = self.monitor.read() if self.instrument else {}
            ev = self.events.emit("step", step=self.step, epoch=round(self.position / self.batches_per_epoch, 4),
                                  loss=clean_number(loss_v), lr=lr, grad_norm=clean_number(stats.get("grad_norm")),
                                  tokens_per_s=round(tokens_session / elapsed, 2) if elapsed > 0 else None,
                                  elapsed_s=round(time.time() - self.t_start, 3), eta_s=round(eta, 2),
                                  memory=mem, total_steps=self.total_steps, tokens=tokens)
            self.history.append({"step": self.step, "loss": loss_v})
            self.tokens_session, self.train_seconds = tokens_session, elapsed
            self.train_cpu_seconds = time.process_time() - cpu0
            if self.progress:
                self.progress(ev)
            last = self.step == self.total_steps
            if self.data.val and (self.step % plan.run.eval_every == 0 or last):
                self.evaluate()
            if self.step % plan.run.save_every == 0 and not last:
                self.save_checkpoint()
            if delay:
                time.sleep(delay)  # test hook: a tiny model trains too fast to be stopped midway
        return "completed"

    def _profile_this_step(self) -> bool:
        """On the CPU (one process) the second step of this session is measured exactly: torch has no
        CPU peak counter, and process RSS also holds library code and allocator caches."""
        return (self.instrument and str(self.device) == "cpu" and self.world == 1
                and self.tensor_peak_cpu is None and self.step >= 1 + (self.resumed_from is not None))

    def _profiled_step(self, step_fn, args: tuple, kwargs: dict):
        """One step under torch.profiler's CPU memory events: live tensors before it (all storages
        reachable from Python, no autograd graph alive) plus the running sum of its allocations and
        frees (runner.memtrace's method; one intra-op thread so no allocation escapes the profiler)."""
        from torch.profiler import ProfilerActivity, profile

        from runner.memtrace import gc_live_tensor_bytes

        torch = self.torch
        base = gc_live_tensor_bytes()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                loss = step_fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
        live = peak = 0
        for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns()):
            live += e.nbytes()
            peak = max(peak, live)
        self.tensor_peak_cpu = base + peak
        return loss

    def _should_stop(self) -> bool:
        """A stop request on any process stops all of them at the same step (a collective)."""
        if self.accelerator is None:
            return bool(self.stop_requested)
        flag = self.torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _mean_across(self, x: float) -> float:
        if self.accelerator is None:
            return x
        torch = self.torch
        v = torch.tensor([x], device=self.device)
        return float(self.accelerator.reduce(v, reduction="mean").item())

    def evaluate(self) -> float:
        from advisor.stack import eval_loss
        from runner.data import collate

        t = self.plan.training
        self.model.eval()
        total, n = 0.0, 0
        pad_to = t.seq_len if self.plan.data.pad_to == "seq_len" else None
        for i in range(0, len(self.data.val), t.micro_batch):
            b = collate(self.data.val[i:i + t.micro_batch], self.tokenizer.pad_token_id, pad_to)
            b = {k: v.to(self.device) for k, v in b.items()}
            total += float(eval_loss(self.model, b, t.precision))
            n += 1
        self.model.train()
        self.val_loss = self._mean_across(total / max(n, 1))
        self.events.emit("eval", step=self.step, val_loss=clean_number(self.val_loss))
        if self.progress:
            self.progress({"type": "eval", "step": self.step, "val_loss": self.val_loss})
        return self.val_loss

    # --- checkpoints ----------------------------------------------------------------------

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model) if self.accelerator is not None else self.model

    def save_checkpoint(self) -> Path | None:
        """checkpoints/step-N, written to a temporary directory and renamed (atomic)."""
        torch = self.torch
        state = None
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
            if self.step > 0:
                state = self.accelerator.get_state_dict(self.model)  # a collective under FSDP/ZeRO-3
        if not self.is_main or self.step == 0:
            return None
        root = self.run_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step}"
        tmp = root / f".tmp-step-{self.step}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        model = self._unwrapped()
        model.save_pretrained(tmp / ("adapter" if self.is_peft else "model"), state_dict=state)
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        try:
            import numpy as np

            rng["numpy"] = np.random.get_state()
        except ImportError:
            pass
        torch.save(rng, tmp / "rng.pt")
        state = {"step": self.step, "position": self.position, "batches_per_epoch": self.batches_per_epoch,
                 "total_steps": self.total_steps, "first_loss": self.first_loss, "val_loss": self.val_loss,
                 "history": self.history[-200:], "world_size": self.world, "time": time.time()}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        kept = sorted((d for d in root.iterdir() if d.name.startswith("step-")),
                      key=lambda d: int(d.name[5:]) if d.name[5:].isdigit() else -1)
        for old in kept[: -self.plan.run.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        self.events.emit("checkpoint", step=self.step, path=str(final.resolve()))
        return final

    def _load_checkpoint(self, ck: Path) -> None:
        torch = self.torch
        model = self._unwrapped()
        if self.is_peft:
            from peft import set_peft_model_state_dict

            state = _load_weights(ck / "adapter")
            set_peft_model_state_dict(model, state)
        else:
            state = _load_weights(ck / "model")
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected:
                raise ModelLoadError(f"checkpoint {ck} does not match the model ({len(unexpected)} unexpected keys)")
        self.optimizer.load_state_dict(torch.load(ck / "optimizer.pt", map_location=self.device, weights_only=False))
        self.scheduler.load_state_dict(torch.load(ck / "scheduler.pt", weights_only=False))
        st = json.loads((ck / "state.json").read_text())
        if st.get("world_size", 1) != self.world:
            self.notes.append(f"resumed with {self.world} processes from a checkpoint written by "
                              f"{st.get('world_size')}; the data order differs from an uninterrupted run")
        self.step, self.position = st["step"], st["position"]
        self.first_loss, self.val_loss = st.get("first_loss"), st.get("val_loss")
        self.history = st.get("history", [])
        rng = torch.load(ck / "rng.pt", weights_only=False)
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if "numpy" in rng:
            import numpy as np

            np.random.set_state(rng["numpy"])

    # --- cleanup --------------------------------------------------------------------------

    def save_final(self) -> None:
        state = None
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
            state = self.accelerator.get_state_dict(self.model)
        if not self.is_main:
            return
        model = self._unwrapped()
        out = self.run_dir / ("adapter" if self.is_peft else "model")
        tmp = self.run_dir / f".tmp-{out.name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp, state_dict=state)
        self.tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        if self.plan.run.merge_export and self.is_peft:
            self._merge_export(out)

    def _merge_export(self, adapter_dir: Path) -> None:
        """Reload the base in the compute dtype (not 4-bit: merging into NF4 would round the
        update away), merge the adapter, save to merged/."""
        import gc

        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from advisor.stack import compute_dtype

        del self.model
        gc.collect()
        base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=compute_dtype(self.plan.training.precision),
                                                    trust_remote_code=self.plan.model.trust_remote_code)
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        merged.save_pretrained(self.run_dir / "merged")
        self.tokenizer.save_pretrained(self.run_dir / "merged")
        self.model = None

    def measured(self) -> dict[str, Any]:
        torch = getattr(self, "torch", None)
        m: dict[str, Any] = {"torch_peak_allocated": None, "torch_peak_reserved": None, "nvml_peak": None,
                             "rss_peak": None, "rss_before_model": getattr(self, "rss_before_model", None)}
        if self.monitor is not None:
            self.monitor.read()
            m["rss_peak"] = self.monitor.peak["rss"]
            m["nvml_peak"] = self.monitor.peak["nvml_used"]
        if torch is not None and str(getattr(self, "device", "cpu")).startswith("cuda") and torch.cuda.is_available():
            m["torch_peak_allocated"] = int(torch.cuda.max_memory_allocated())
            m["torch_peak_reserved"] = int(torch.cuda.max_memory_reserved())
        if m["rss_peak"] is not None and m["rss_before_model"] is not None:
            m["rss_growth"] = m["rss_peak"] - m["rss_before_model"]
        m["tensor_peak_cpu"] = getattr(self, "tensor_peak_cpu", None)
        return m

    def report(self, status: str) -> dict[str, Any]:
        measured = self.measured()
        pred = self.predicted
        on_gpu = measured["torch_peak_allocated"] is not None
        if on_gpu:
            compare = {"what": "torch.cuda.max_memory_allocated vs predicted peak_allocated_bytes",
                       "measured": measured["torch_peak_allocated"], "predicted": pred.get("peak_allocated_bytes")}
        elif measured.get("tensor_peak_cpu"):
            compare = {"what": "live tensor bytes at the peak of one profiled step (torch.profiler CPU memory "
                               "events) vs predicted peak_allocated_bytes",
                       "measured": measured["tensor_peak_cpu"], "predicted": pred.get("peak_allocated_bytes")}
        else:
            compare = {"what": "process RSS growth from before the model was loaded to its peak vs predicted "
                               "peak_allocated_bytes (RSS also holds non-tensor memory: library code, allocator "
                               "caches; on a tiny model that dominates)",
                       "measured": measured.get("rss_growth"), "predicted": pred.get("peak_allocated_bytes")}
        if compare["measured"] and compare["predicted"]:
            compare["ratio"] = round(compare["measured"] / compare["predicted"], 3)
        notes = list(self.notes)
        if self.plan.data.pad_to == "longest":
            notes.append("batches were padded to their longest example (data.pad_to=longest), shorter than "
                         f"training.seq_len={self.plan.training.seq_len} the estimate assumes; "
                         "data.pad_to=seq_len makes them match")
        tail = [h["loss"] for h in self.history[-5:] if h.get("loss") is not None]
        train_s = getattr(self, "train_seconds", 0.0)
        rep = {
            "status": status, "run_dir": str(self.run_dir.resolve()), "model": self.plan.model.ref,
            "method": self.plan.training.method, "device": self._device_words() if hasattr(self, "device") else None,
            "world_size": self.world, "steps": self.step, "total_steps": getattr(self, "total_steps", None),
            "resumed_from": self.resumed_from,
            "runtime_s": round(time.time() - self.t_start, 2), "train_s": round(train_s, 2),
            "tokens_per_s": round(self.tokens_session / train_s, 1) if train_s else None,
            "loss": {"first": clean_number(self.first_loss),
                     "last": clean_number(self.history[-1]["loss"]) if self.history else None,
                     "final_train": clean_number(sum(tail) / len(tail)) if tail else None,
                     "final_val": clean_number(self.val_loss)},
            "predicted": pred, "measured": measured, "compare": compare, "notes": notes,
            "adapter": str((self.run_dir / "adapter").resolve()) if (self.run_dir / "adapter").exists() else None,
        }
        return rep

    def cleanup(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
        if self.events is not None:
            self.events.close()

    # --- the whole run --------------------------------------------------------------------

    def run(self) -> int:
        """setup -> train -> cleanup with the run directory kept valid at every exit. Exit code."""
        self.tokens_session, self.train_seconds = 0, 0.0
        previous = _install_signal_handlers(self)
        try:
            try:
                self.setup()
                status = self.train()
                self.save_final()
                code = 0
            except RunStopped:
                self.save_checkpoint()
                status, code = "interrupted", EXIT_INTERRUPTED
            rep = self.report(status)
            if self.is_main:
                _write_json(self.run_dir / "report.json", rep)
            self.events.emit("end", status=status, step=self.step, report=rep)
            self.final_report = rep
            return code
        except BaseException as e:  # noqa: BLE001 - every failure leaves an error event
            self._record_error(e)
            if isinstance(e, KeyboardInterrupt):
                return EXIT_INTERRUPTED
            return EXIT_FAILED
        finally:
            _restore_signal_handlers(previous)
            self.cleanup()

    def _record_error(self, e: BaseException) -> None:
        from runner.data import DataError

        if _is_oom(e):
            kind = "oom"
        elif isinstance(e, DataError):
            kind = "data"
        elif isinstance(e, ModelLoadError):
            kind = "model"
        else:
            kind = "runtime"
        message = "; ".join(e.problems) if isinstance(e, DataError) else (str(e).splitlines() or [""])[0]
        measured = self.measured() if kind == "oom" else None
        peak = None
        if measured:
            peak = measured["torch_peak_allocated"] or measured["nvml_peak"] or measured["rss_peak"]
        suggestion = None
        if kind == "oom":
            try:
                from runner.launch import next_plan

                suggestion = next_plan(self.plan, self.run_dir, getattr(self, "shape", None), peak)
            except Exception as err:  # the advice must never hide the error itself
                suggestion = {"command": None, "changes": {}, "note": f"no suggestion: {err}"}
        self.error = {"kind": kind, "message": message, "measured_peak": peak, "suggestion": suggestion}
        if self.events is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.events = EventWriter(self.run_dir)
        self.events.emit("error", **self.error)
        if kind == "runtime":
            (self.run_dir / "traceback.txt").write_text("".join(traceback.format_exception(e)))
        try:
            rep = self.report("failed")
            rep["error"] = self.error
            if self.is_main:
                _write_json(self.run_dir / "report.json", rep)
        except Exception:
            pass


def _preimport(method: str) -> None:
    import peft  # noqa: F401
    import transformers.models.auto.modeling_auto  # noqa: F401

    if method == "qlora":
        import bitsandbytes  # noqa: F401


def _is_oom(e: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower() and "cuda" in str(e).lower()


def _load_weights(d: Path) -> dict:
    """The tensors of a save_pretrained directory (one file or an index of shards)."""
    from safetensors.torch import load_file

    files = sorted(d.glob("*.safetensors"))
    if not files:
        import torch

        files = sorted(d.glob("*.bin"))
        state: dict = {}
        for f in files:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state
    state = {}
    for f in files:
        state.update(load_file(f))
    return state


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _install_signal_handlers(recipe: Recipe):
    """SIGTERM and SIGINT ask the loop to stop after the current step (it then checkpoints)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        if recipe.stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        recipe.stop_requested = signal.Signals(signum).name
        recipe.log(f"{recipe.stop_requested}: finishing this step, then saving a checkpoint "
                   "(again to stop at once)")

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, handler)
    return previous


def _restore_signal_handlers(previous) -> None:
    if previous:
        for s, h in previous.items():
            signal.signal(s, h)
