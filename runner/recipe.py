"""The training recipe: setup -> train -> cleanup, one visible loop.

``Recipe(plan, run_dir).run()`` is the whole run: it takes the run directory (:mod:`runner.rundir`:
a lock, nothing of anyone else's overwritten), loads the model as :mod:`advisor.stack` does (the
same code the memory calibration measures), tokenizes the data (:mod:`runner.data`), trains with
:func:`advisor.stack.train_step`, and writes the run directory::

    RUN_DIR/run.lock             held while the run is alive (owner PID and host inside)
    RUN_DIR/plan.yaml            the resolved plan (no secrets)
    RUN_DIR/events.jsonl         start, step, memory, eval, checkpoint, end / error events
    RUN_DIR/report.json          predicted vs measured peak memory, runtime, losses (runner.report)
    RUN_DIR/checkpoints/step-N/  weights, optimizer, scheduler, generators, data position (runner.checkpoint)
    RUN_DIR/adapter/             final LoRA/QLoRA adapter (PEFT format; model/ for full fine-tuning)
    RUN_DIR/merged/              base + adapter merged (run.merge_export)

SIGTERM / Ctrl-C finish the current step, write a checkpoint and an ``end`` event with status
``interrupted``; a second Ctrl-C stops at once. ``Recipe(..., resume=True)`` continues from the
newest checkpoint (or starts again from step 0 when the run stopped before its first one).
Under ``accelerate launch`` (several processes) rank 0 writes the run directory; the model is
wrapped by accelerate (DDP, FSDP or DeepSpeed as the generated config says).
``hooks`` (:class:`Hooks`) let tests and tools act between steps without touching the loop.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from advisor.problems import Problems
from advisor.spec import Plan
from runner import exits, saving
from runner.events import EventWriter, clean_number
from runner.failfast import dist_type
from runner.hooks import Hooks
from runner.modeldir import ModelLoadError


class Recipe:
    """One fine-tuning run of ``plan`` writing ``run_dir``. See the module doc."""

    def __init__(self, plan: Plan, run_dir: str | Path, *, resume: bool = False, command: list[str] | None = None,
                 progress: Callable[[dict], None] | None = None, log: Callable[[str], None] | None = None,
                 monitor_interval: float = 0.5, instrument: bool = True, hooks: Hooks | None = None):
        self.plan = plan
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.command = command or sys.argv
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.monitor_interval = monitor_interval
        self.instrument = instrument  # False: no events file, no monitor thread (overhead benchmark only)
        self.hooks = hooks or Hooks()
        self.tensor_peak_cpu: int | None = None  # CPU: live tensor bytes of one profiled step
        self.stop_requested: str | None = None
        self.step = 0
        self.saved_step: int | None = None  # the step the newest checkpoint holds (never saved twice)
        self.position = 0  # micro-batches consumed (per process), the data position
        self.history: list[dict] = []
        self.val_loss: float | None = None
        self.first_loss: float | None = None
        self.events: EventWriter | None = None
        self.monitor = None
        self.accelerator = None
        self.lock = None
        self.rank, self.world = 0, 1
        self.is_main = True
        self.predicted: dict[str, Any] = {"peak_allocated_bytes": None, "peak_reserved_bytes": None}
        self.notes: list[str] = []
        self.resumed_from: str | None = None
        self.t_start = time.time()

    # --- the run directory ----------------------------------------------------------------

    def take_run_dir(self) -> None:
        """Rank 0: lock the run directory, refuse it if it is not ours to write (Problems, before
        anything is written), remove half-written checkpoints, and move an earlier attempt that
        never reached a checkpoint aside, so that this one starts clean."""
        from runner import rundir
        from runner.checkpoint import clean_partial

        if int(os.environ.get("RANK", "0") or 0) != 0:
            return
        self.lock = rundir.RunLock.acquire(self.run_dir, self.command)
        try:
            links = rundir.links_in(self.run_dir)
            if links:  # before anything below touches the directory
                raise Problems(rundir.link_problem(self.run_dir, links))
            removed, promoted = clean_partial(self.run_dir)
            st = rundir.check(self.run_dir, self.plan, resume=self.resume)
        except Problems:
            self.lock.release()
            raise
        for d in removed:
            self.notes.append(f"removed the half-written checkpoint {d.name} of a run that died while saving")
        for d in promoted:
            self.notes.append(f"completed {d.name}: a run died while renaming it into place; its copy was whole")
        if self.resume and st.checkpoint is None:
            self.log(f"{self.run_dir} has no checkpoint yet (the run stopped before its first): starting from step 0")
            self.resume = False
        if not self.resume:
            moved = rundir.restart(self.run_dir)
            if moved is not None:
                self.notes.append(f"an earlier attempt stopped before its first checkpoint; its events are in {moved}")

    # --- setup ----------------------------------------------------------------------------

    def setup(self) -> None:
        """Processes and device, the data, the model with its optimizer and schedule, the checkpoint."""
        self._setup_process()
        start = self._setup_data()
        self.events.emit("start", run_dir=str(self.run_dir.resolve()), plan=self.plan.model_dump(mode="json"),
                         command=list(self.command), predicted=self.predicted, total_steps=self.total_steps,
                         device=self._device_words(), resumed_from=self.resumed_from, step=start,
                         world_size=self.world, data={"format": self.data.format, "template": self.data.template,
                                                      **self.data.stats})
        if self.is_main and self.instrument:
            self.monitor.start()  # memory events from here on: model loading included
        if self.hooks.before_load:
            self.hooks.before_load(self)
        self._setup_model()
        if self.resumed_from:
            saving.load_checkpoint(self, Path(self.resumed_from))
        if self.is_main and self.resume:  # with this command's overrides (more steps...), now that they work
            self._save_plan()
        from runner.failfast import check_longest_batch

        check_longest_batch(self)  # the longest batch, once, before step 1: an OOM shows now, not hours in

    def _setup_process(self) -> None:
        """The device (and the process group under several processes), the events file, the monitor,
        the resolved plan in the run directory, the seed."""
        import warnings

        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress bar; no "Loading weights" bars in the log
        warnings.filterwarnings("ignore", category=FutureWarning)
        self.torch = torch
        plan = self.plan
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
        if self.is_main and not self.resume:  # the resolved plan (a resume saves it once its checkpoint loads)
            self._save_plan()
        self._seed(plan.run.seed)

    def _save_plan(self) -> None:
        from advisor.planfile import save_plan

        save_plan(self.plan, self.run_dir / "plan.yaml")

    def _setup_data(self) -> int:
        """The model directory, the prediction, the tokenizer, the tokenized data and the number of
        steps; the step this session starts at (the checkpoint's on resume)."""
        from transformers import AutoTokenizer

        from runner.checkpoint import latest_checkpoint, read_state
        from runner.data import DataError, prepare
        from runner.modeldir import find_model_dir

        plan, t = self.plan, self.plan.training
        start = 0
        if self.resume:
            ck = latest_checkpoint(self.run_dir)
            self.resumed_from = str(ck) if ck else None
            start = read_state(ck)["step"] if ck else 0
        self.model_dir = find_model_dir(plan.model.ref, plan.model.revision)
        self._predict()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir,
                                                           trust_remote_code=self.plan.model.trust_remote_code)
        except Exception as e:  # noqa: BLE001 - any failure here means the directory's tokenizer is unusable
            raise ModelLoadError(f"cannot load the tokenizer from {self.model_dir}: {e}".splitlines()[0]) from None
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token is None:
                raise ModelLoadError(f"the tokenizer in {self.model_dir} has neither a padding nor an end-of-sequence "
                                     "token, so batches cannot be padded and examples cannot be ended; set "
                                     "\"eos_token\" (and \"pad_token\") in its tokenizer_config.json")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.data = prepare(plan.data, self.tokenizer, t.seq_len, plan.run.seed)
        for w in self.data.warnings:
            self.log(f"warning: {w}")
        self.per_rank = len(self.data.train) // self.world
        if self.per_rank < 1:
            raise DataError([f"{len(self.data.train)} training examples cannot feed {self.world} processes"])
        self.batches_per_epoch = math.ceil(self.per_rank / t.micro_batch)
        if plan.run.max_steps:
            self.total_steps = plan.run.max_steps
        else:
            self.total_steps = max(1, math.ceil(plan.run.epochs * self.batches_per_epoch / t.grad_accum))
        if start >= self.total_steps:
            raise Problems(f"the checkpoint {self.resumed_from} is at step {start} and this plan has "
                           f"{self.total_steps} steps in all; resume with run.max_steps above {start}")
        return start

    def _setup_model(self) -> None:
        """The model as advisor.stack loads it (wrapped by accelerate under several processes), its
        optimizer and learning-rate schedule."""
        from transformers import get_scheduler

        from advisor.stack import load_for_training, make_optimizer

        t = self.plan.training
        _preimport(t.method)  # library code pages are not the model: keep them out of the RSS baseline
        self.rss_before_model = self.monitor.read()["rss"]
        try:
            self.model = load_for_training(self.model_dir, t, device=self.device,
                                           trust_remote_code=self.plan.model.trust_remote_code,
                                           fsdp=self.accelerator is not None and self.dist_type() == "FSDP")
        except Exception as e:  # noqa: BLE001 - damaged weights, a config transformers rejects, a missing library
            if exits.is_oom(e):
                raise
            raise ModelLoadError(f"cannot load {self.model_dir} for {t.method} training: "
                                 f"{type(e).__name__}: {e}".splitlines()[0]) from None
        self.is_peft = t.method in ("lora", "qlora")
        self._check_vocabulary()
        for mod in self.model.modules():
            # bitsandbytes (CPU, AVX512-BF16 machines) repacks a 4-bit weight into a CPU-only layout the
            # first time it runs in eval mode, and that repacking fails for dimensions that are not a
            # multiple of 128 (seen: 128 x 352). Training never takes that path; keep evaluation on it too.
            if hasattr(mod, "support_avx512bf16_for_cpu"):
                mod.support_avx512bf16_for_cpu = False
        if self.accelerator is not None and self.dist_type() == "FSDP":
            from advisor.stack import fsdp_wrap_policy

            policy = fsdp_wrap_policy(self.model)  # LoRA: the adapters are units of their own (fp32)
            if policy is not None:
                self.accelerator.state.fsdp_plugin.auto_wrap_policy = policy
        if self.accelerator is not None and self.dist_type() != "DEEPSPEED":
            self.model = self.accelerator.prepare(self.model)
        self.optimizer = make_optimizer(self.model, t.optimizer, t.learning_rate)
        if self.accelerator is not None and self.dist_type() == "DEEPSPEED":
            # no dataloader goes through accelerate, so tell DeepSpeed the micro-batch itself
            self.accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = t.micro_batch
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[self.plan.run.lr_scheduler]
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=self.plan.run.warmup_steps,
                                       num_training_steps=self.total_steps)

    def _check_vocabulary(self) -> None:
        """Every token id of the data has a row in the model's embedding (a tokenizer larger than the
        model's vocabulary fails later inside the forward with an index error)."""
        emb = self.model.get_input_embeddings()
        rows = getattr(emb, "num_embeddings", None)
        top = max((max(ex.input_ids) for ex in [*self.data.train, *self.data.val] if ex.input_ids), default=-1)
        if rows is not None and top >= rows:
            raise ModelLoadError(f"the data holds token id {top}, but the model's embedding has {rows} rows: the "
                                 f"tokenizer in {self.model_dir} ({len(self.tokenizer)} tokens) does not belong to "
                                 "this model; use the model's own tokenizer, or resize the model's embeddings to "
                                 "the tokenizer (model.resize_token_embeddings) and save it")

    def _seed(self, seed: int) -> None:
        from transformers import set_seed

        set_seed(seed)

    def dist_type(self) -> str:
        return dist_type(self.accelerator)

    def _device_words(self) -> str:
        torch = self.torch
        if self.device.startswith("cuda"):
            name = torch.cuda.get_device_name(torch.device(self.device))
            return f"{name} x {self.world}" if self.world > 1 else name
        return f"cpu ({os.cpu_count()} cores)" + (f" x {self.world} processes" if self.world > 1 else "")

    def _predict(self) -> None:
        """The advisor's estimate for this plan: what the report compares the measurement with."""
        try:
            from advisor.service import prediction

            res = prediction(self.plan, str(self.model_dir))
            self.shape = res.shape
            self.predicted = {"peak_allocated_bytes": res.peak_allocated_bytes,
                              "peak_reserved_bytes": res.peak_reserved_bytes, "peak_phase": res.breakdown.peak_phase,
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
        from runner.profiling import profiled_step

        plan, t = self.plan, self.plan.training
        hooks = self.hooks
        backward = clip = None
        if self.accelerator is not None:
            backward = self.accelerator.backward
            if self.dist_type() == "FSDP":
                clip = self.accelerator.clip_grad_norm_
            elif self.dist_type() == "DEEPSPEED":
                clip = lambda params, max_norm: None  # noqa: E731 - the engine clips (gradient_clipping)
        session_start_step, t0, cpu0 = self.step, time.time(), time.process_time()
        tokens_session = 0
        from runner.speed import SpeedMeter, device_name

        self.speed = SpeedMeter(plan, self.shape, self.device, device_name(self.device), self.world, self.total_steps)
        while self.step < self.total_steps:
            if self._should_stop():
                raise exits.RunStopped(self.stop_requested or "SIGTERM")
            t_step = time.perf_counter()
            micro = [self._micro_batch(self.position + i) for i in range(t.grad_accum)]
            tokens = int(sum(int(b["attention_mask"].sum()) for b in micro)) * self.world
            positions = int(sum(b["attention_mask"].numel() for b in micro)) * self.world
            if hooks.before_step:
                hooks.before_step(self)
            stats: dict[str, Any] = {}
            step_args = (self.model, micro, self.optimizer, t, plan.run.max_grad_norm)
            step_kwargs = {"backward": backward, "clip_grad": clip, "stats": stats}
            if self._profile_this_step():
                loss, self.tensor_peak_cpu = profiled_step(train_step, step_args, step_kwargs)
            else:
                loss = train_step(*step_args, **step_kwargs)
            self.scheduler.step()
            self.position += t.grad_accum
            self.step += 1
            tokens_session += tokens
            loss_v = self._mean_across(float(loss))
            speed = self.speed.add(time.perf_counter() - t_step, tokens, positions)  # runner.speed: vs the time model
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
                                  memory=mem, total_steps=self.total_steps, tokens=tokens, speed=speed)
            self.history.append({"step": self.step, "loss": loss_v})
            self.tokens_session, self.train_seconds = tokens_session, elapsed
            self.train_cpu_seconds = time.process_time() - cpu0
            if self.progress:
                self.progress(ev)
            self._check_finite(loss_v, stats.get("grad_norm"))
            last = self.step == self.total_steps
            if self.data.val and (self.step % plan.run.eval_every == 0 or last):
                self.evaluate()
            if self.step % plan.run.save_every == 0 and not last:
                saving.save_checkpoint(self)
            if hooks.after_step:
                hooks.after_step(self)
        return "completed"

    def _check_finite(self, loss: float, grad_norm: float | None) -> None:
        """A loss that is not a finite number, or (without amp-fp16's loss scaler, which skips such steps
        itself) a gradient norm that is not: the weights of this step are not to be trusted, so the run
        stops before it saves them (exits.LossDiverged; the same on every process: both are global)."""
        scaled = self.plan.training.precision == "amp-fp16"
        if not math.isfinite(loss) or (grad_norm is not None and not scaled and not math.isfinite(grad_norm)):
            raise exits.LossDiverged(self.step, loss, grad_norm)

    def weights_finite(self) -> bool:
        """Every trainable weight is a finite number (on every process: a collective under several)."""
        torch = self.torch
        bad = any(not bool(torch.isfinite(p).all()) for p in self.model.parameters() if p.requires_grad and p.numel())
        if self.accelerator is None:
            return not bad
        return self._mean_across(1.0 if bad else 0.0) == 0.0

    def _profile_this_step(self) -> bool:
        """On the CPU (one process) the second step of this session is measured exactly (runner.profiling)."""
        return (self.instrument and str(self.device) == "cpu" and self.world == 1
                and self.tensor_peak_cpu is None and self.step >= 1 + (self.resumed_from is not None))

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

    def measured(self) -> dict[str, Any]:
        from runner.report import measured_memory

        return measured_memory(self.monitor, getattr(self, "device", None), getattr(self, "rss_before_model", None),
                               self.tensor_peak_cpu)

    def next_step(self, status: str) -> dict[str, str] | None:
        """What to type next (None when the run completed): runner.rundir.next_command."""
        from runner.rundir import next_command

        return None if status == "completed" else next_command(self.run_dir)

    def report(self, status: str) -> dict[str, Any]:
        from runner.report import comparison, loss_summary

        measured = self.measured()
        notes = list(self.notes)
        if self.plan.data.pad_to == "longest":
            notes.append("batches were padded to their longest example (data.pad_to=longest), shorter than "
                         f"training.seq_len={self.plan.training.seq_len} the estimate assumes; "
                         "data.pad_to=seq_len makes them match")
        train_s = getattr(self, "train_seconds", 0.0)
        return {
            "status": status, "run_dir": str(self.run_dir.resolve()), "model": self.plan.model.ref,
            "method": self.plan.training.method, "device": self._device_words() if hasattr(self, "device") else None,
            "world_size": self.world, "steps": self.step, "total_steps": getattr(self, "total_steps", None),
            "resumed_from": self.resumed_from,
            "runtime_s": round(time.time() - self.t_start, 2), "train_s": round(train_s, 2),
            "tokens_per_s": round(self.tokens_session / train_s, 1) if train_s else None,
            "loss": loss_summary(self.first_loss, self.history, self.val_loss),
            "predicted": self.predicted, "measured": measured, "compare": comparison(measured, self.predicted),
            "speed": self.speed.summary() if getattr(self, "speed", None) else None,
            "notes": notes,
            "adapter": str((self.run_dir / "adapter").resolve()) if (self.run_dir / "adapter").exists() else None,
            "next": self.next_step(status),
        }

    def cleanup(self) -> None:
        self.stop_sampling()
        self._close_process_group()
        if self.events is not None:
            self.events.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _close_process_group(self) -> None:
        """Every rank leaves the process group explicitly (PyTorch's advice): a gloo group torn down
        only at interpreter exit can abort the process ("terminate called without an active exception",
        seen on a resumed 2-node CPU run), and the other node's launcher then waits at its exit barrier."""
        if self.accelerator is None:
            return
        dist = self.torch.distributed
        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - leaving is best effort; the run's result is already written
                pass

    # --- the whole run --------------------------------------------------------------------

    def run(self) -> int:
        """take the run directory -> setup -> train -> cleanup, the directory kept valid at every exit.
        The exit code; Problems (nothing written) when the run directory is not this run's to write."""
        self.tokens_session, self.train_seconds = 0, 0.0
        self.take_run_dir()
        previous = exits.install_signal_handlers(self)
        try:
            try:
                self.setup()
                status = self.train()
                saving.save_final(self)
                code = 0
            except exits.RunStopped:
                saving.save_checkpoint(self)
                status, code = "interrupted", exits.EXIT_INTERRUPTED
            except KeyboardInterrupt:  # a second Ctrl-C: stop at once, no checkpoint of this step
                self.log("stopped at once (a second Ctrl-C): this step is not saved")
                status, code = "interrupted", exits.EXIT_INTERRUPTED
            self.stop_sampling()
            rep = self.report(status)
            if self.is_main:
                from runner.report import write_json

                write_json(self.run_dir / "report.json", rep)
            if self.events is None:  # stopped before setup opened the events file
                self.events = EventWriter(self.run_dir, enabled=self.is_main and self.instrument)
            self.events.emit("end", status=status, step=self.step, report=rep)
            self.final_report = rep
            return code
        except BaseException as e:  # noqa: BLE001 - every failure leaves an error event
            exits.record_error(self, e)
            return exits.EXIT_INTERRUPTED if isinstance(e, KeyboardInterrupt) else exits.EXIT_FAILED
        finally:
            exits.restore_signal_handlers(previous)
            self.cleanup()

    def stop_sampling(self) -> None:
        """No memory event after this: the run's last event is its end or its error."""
        if self.monitor is not None:
            self.monitor.stop()


def _preimport(method: str) -> None:
    import peft  # noqa: F401
    import transformers.models.auto.modeling_auto  # noqa: F401

    if method == "qlora":
        import bitsandbytes  # noqa: F401
