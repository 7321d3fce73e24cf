"""Start a run as a subprocess (python, or `accelerate launch` / torchrun on several GPUs and nodes)
and find its files.

Several nodes: every node runs ``tuneplan run PLAN --run-dir DIR hardware.node_rank=K`` (see
:func:`node_commands`); each builds the launcher command for its own GPUs (:func:`build_command`):
``accelerate launch --num_machines N --machine_rank K --main_process_ip A ...`` on GPUs, torchrun
``--nnodes N --node-rank K --master-addr A`` on CPUs (accelerate starts several CPU processes only
through mpirun). Global rank 0 (on node 0) writes the run directory.

Light imports only (pydantic, yaml): the TUI builds and starts commands with this module.
Processes are started from an argument list, never through a shell.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advisor.spec import Plan

ACCELERATE_CONFIG = "accelerate_config.yaml"


def _load(plan_path: str | Path, overrides=(), trust_remote_code: bool = False) -> Plan:
    from advisor.planfile import apply_overrides, consent, load_plan

    plan = load_plan(plan_path, trust_remote_code)
    return consent(apply_overrides(plan, list(overrides)), trust_remote_code) if overrides else plan


def resolve_run_dir(plan: Plan) -> Path:
    from runner.rundir import default_run_dir

    return default_run_dir(plan)


def is_distributed(plan: Plan) -> bool:
    return plan.hardware.gpus > 1


def gpus_per_node(plan: Plan) -> int:
    """hardware.gpus is the total; the spec checks that it divides evenly over hardware.nodes."""
    return plan.hardware.gpus // plan.hardware.nodes


def uses_accelerate_config(plan: Plan) -> bool:
    return is_distributed(plan) and plan.hardware.device == "cuda"


def accelerate_config(plan: Plan, port: int | None = None) -> dict[str, Any]:
    """The `accelerate launch` config for the plan's hardware: DDP (zero 0), DeepSpeed ZeRO-1/2
    (zero 1, 2) or FSDP full shard (zero 3). Precision is the runner's business (mixed_precision no:
    the model is loaded in the plan's dtype, amp-* autocasts in the step), except ``mixed-bf16``, which is
    accelerate's own ``mixed_precision: bf16``: FSDP's MixedPrecision over the fp32 shards (zero 3), DeepSpeed's
    bf16 engine with fp32 master partitions (zero 1-2), autocast under DDP (zero 0)."""
    hw = plan.hardware
    cpu = hw.device == "cpu"
    mixed = "bf16" if plan.training.precision == "mixed-bf16" else "no"
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE", "num_machines": hw.nodes, "machine_rank": hw.node_rank,
        "num_processes": hw.gpus, "mixed_precision": mixed, "use_cpu": cpu, "same_network": True,
        "rdzv_backend": "static", "main_training_function": "main", "debug": False,
        "main_process_port": hw.main_port if hw.nodes > 1 else (port or 29500),
    }
    if hw.nodes > 1:
        cfg["main_process_ip"] = hw.main_address
    if cpu:
        cfg["distributed_type"] = "MULTI_CPU"
    elif hw.zero == 0:
        cfg.update(distributed_type="MULTI_GPU", gpu_ids="all")
    elif hw.zero in (1, 2):
        cfg.update(distributed_type="DEEPSPEED", gpu_ids="all", deepspeed_config={
            # DeepSpeed's engine steps inside accelerator.backward once every gradient_accumulation_steps
            "zero_stage": hw.zero, "gradient_accumulation_steps": plan.training.grad_accum,
            "gradient_clipping": plan.run.max_grad_norm or 0.0, "offload_optimizer_device": "none",
            "offload_param_device": "none", "zero3_init_flag": False})
    else:
        cfg.update(distributed_type="FSDP", gpu_ids="all", fsdp_config={
            "fsdp_version": 1, "fsdp_sharding_strategy": "FULL_SHARD",
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_offload_params": False,
            "fsdp_use_orig_params": True,  # LoRA: frozen and trainable parameters in one flat group
            "fsdp_sync_module_states": True, "fsdp_cpu_ram_efficient_loading": True})
    return cfg


def write_accelerate_config(plan: Plan, run_dir: str | Path) -> Path:
    import yaml

    from advisor.safefile import write_atomic

    path = Path(run_dir) / ACCELERATE_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    port = None if plan.hardware.nodes > 1 else free_port()  # several nodes: the plan's main_port
    return write_atomic(path, yaml.safe_dump(accelerate_config(plan, port), sort_keys=False))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_command(plan_path: str | Path | None, run_dir: str | Path | None = None, resume: str | Path | None = None,
                  overrides=(), force: bool = False, python: str | None = None,
                  trust_remote_code: bool = False) -> list[str]:
    """The argument list that runs the plan: ``python -m runner PLAN k=v --run-dir DIR`` on one
    device, ``python -m accelerate.commands.launch --config_file DIR/accelerate_config.yaml -m runner
    ... --worker`` on several. With ``resume`` the plan is the run directory's plan.yaml."""
    python = python or sys.executable
    overrides = list(overrides)
    if resume is not None:
        run_dir = Path(resume)
        plan = _load(run_dir / "plan.yaml", overrides, trust_remote_code)
        args = ["--resume", str(run_dir)]
    else:
        if plan_path is None:
            raise ValueError("give a plan file or resume=RUN_DIR")
        plan = _load(plan_path, overrides, trust_remote_code)
        run_dir = Path(run_dir) if run_dir is not None else resolve_run_dir(plan)
        args = [str(plan_path), "--run-dir", str(run_dir)]
    args += overrides
    if force:
        args.append("--force")
    if trust_remote_code:
        args.append("--trust-remote-code")
    if not is_distributed(plan):
        return [python, "-m", "runner", *args]
    return [python, "-m", *launcher_args(plan, run_dir), "-m", "runner", *args, "--worker"]


def launcher_args(plan: Plan, run_dir: str | Path) -> list[str]:
    """What starts this node's processes, after ``python -m`` (nothing on one device):
    torch.distributed.run (torchrun) for CPU processes, ``accelerate.commands.launch`` on GPUs."""
    hw = plan.hardware
    if not is_distributed(plan):
        return []
    per_node = gpus_per_node(plan)
    if hw.device == "cpu":
        # `accelerate launch` starts several CPU processes only through mpirun; torchrun does it
        # directly, and accelerate's Accelerator inside each process still sets up DDP (gloo).
        if hw.nodes == 1:
            return ["torch.distributed.run", "--standalone", "--nproc_per_node", str(per_node)]
        return ["torch.distributed.run", "--nnodes", str(hw.nodes), "--node_rank", str(hw.node_rank),
                "--nproc_per_node", str(per_node), "--master_addr", str(hw.main_address),
                "--master_port", str(hw.main_port)]
    cmd = ["accelerate.commands.launch", "--config_file", str(Path(run_dir) / ACCELERATE_CONFIG)]
    if hw.nodes > 1:  # on the command line too: they win over a config file another node wrote
        cmd += ["--num_machines", str(hw.nodes), "--machine_rank", str(hw.node_rank), "--num_processes",
                str(hw.gpus), "--main_process_ip", str(hw.main_address), "--main_process_port", str(hw.main_port)]
    return cmd


def node_commands(plan: Plan, plan_path: str | Path, run_dir: str | Path, program: str = "tuneplan") -> list[list[str]]:
    """The command to type on each node, node 0 first: ``tuneplan run PLAN --run-dir DIR
    hardware.node_rank=K``. One run directory for all of them (on a shared file system, or each
    node's own copy: rank 0 on node 0 writes the plan, events and checkpoints)."""
    base = [program, "run", str(plan_path), "--run-dir", str(run_dir)]
    if plan.hardware.nodes == 1:
        return [base]
    return [[*base, f"hardware.node_rank={k}"] for k in range(plan.hardware.nodes)]


def format_command(cmd: list[str]) -> str:
    """A command line to copy into a shell."""
    return shlex.join(cmd)


@dataclass
class RunHandle:
    run_dir: Path
    process: subprocess.Popen
    command: list[str]
    log_path: Path | None = None
    _log: Any = field(default=None, repr=False)

    def poll(self) -> int | None:
        return self.process.poll()

    def stop(self) -> None:
        """SIGTERM: the run finishes its step, checkpoints, and ends with status interrupted."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            if self._log is not None and self.process.poll() is not None:
                self._log.close()

    def events(self, offset: int = 0):
        from runner.events import read_events

        return read_events(self.run_dir, offset)


def start_run(plan_path: str | Path | None, run_dir: str | Path | None = None, resume: str | Path | None = None,
              overrides=(), force: bool = False, env: dict[str, str] | None = None,
              capture: bool = True) -> RunHandle:
    """Start the run in a subprocess; its output goes to RUN_DIR/run.log (capture) and its
    progress to RUN_DIR/events.jsonl. Returns at once. Raises advisor.problems.UserError (every
    problem, one line each) when the plan cannot run: bad data lines, a model without weights, a
    plan that does not fit hardware.gpu (unless ``force``)."""
    from runner.preflight import preflight

    overrides = list(overrides)
    if resume is not None:
        run_dir = Path(resume)
        plan = _load(run_dir / "plan.yaml", overrides)
    else:
        plan = _load(plan_path, overrides)
        run_dir = Path(run_dir) if run_dir is not None else resolve_run_dir(plan)
    # The same checks `tuneplan run` makes (data lines, model weights, GPU, fit), here, so that a
    # caller (the TUI) gets the problems as an exception instead of a process that exits with 2.
    preflight(plan, Path(resume) / "plan.yaml" if resume is not None else Path(plan_path), force, log=lambda m: None,
              run_dir=Path(run_dir), resume=resume is not None)  # also: the run directory is free and ours
    cmd = build_command(plan_path, run_dir, resume, overrides, force)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if uses_accelerate_config(plan):
        write_accelerate_config(plan, run_dir)
    log_path = run_dir / "run.log" if capture else None
    log = None
    if log_path:  # never through a link (closed by RunHandle.wait)
        from advisor.safefile import open_nofollow

        log = os.fdopen(open_nofollow(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab")
    full_env = {**os.environ, **(env or {}), "TUNEPLAN_NO_PROGRESS": "1"}
    root = str(Path(__file__).resolve().parent.parent)
    full_env["PYTHONPATH"] = root + (os.pathsep + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else "")
    proc = subprocess.Popen(cmd, stdout=log or None, stderr=subprocess.STDOUT if log else None, env=full_env,
                            start_new_session=False)
    return RunHandle(run_dir, proc, cmd, log_path, log)


# --- several processes: launch, forward signals, report -----------------------------------------

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _workers(proc: subprocess.Popen) -> list:
    """The launcher's descendants (the training processes), not the launcher itself."""
    import psutil

    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []


def forward_stop(proc: subprocess.Popen, signum: int) -> None:
    """A stop signal for a run under a launcher reaches every training process directly: each finishes
    its step, the checkpoint is saved together, and they end. The launcher (torchrun's agent) is not
    signalled: it would stop the workers itself and kill them 30 s later, mid-checkpoint. Before the
    workers exist the launcher itself stops."""
    targets = _workers(proc)
    if not targets:
        if proc.poll() is None:
            proc.send_signal(signum)
        return
    for p in targets:
        try:
            p.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)
        except Exception:  # noqa: BLE001 - a worker that has just ended
            pass


def launch_and_wait(cmd: list[str], log=None) -> int:
    """Run ``cmd`` (accelerate launch or torchrun, from an argument list) in a session of its own and wait;
    the launcher's exit code (runner.exits.outcome_code turns it into the run's). SIGTERM, SIGINT and
    SIGHUP sent to this process (also as PID 1 in a container, where signals without a handler are
    dropped) are forwarded to the training processes (:func:`forward_stop`)."""
    import threading

    proc = subprocess.Popen(cmd, start_new_session=True)  # the terminal's Ctrl-C reaches this process only
    previous = {}
    if threading.current_thread() is threading.main_thread():
        def handler(signum, frame):
            if log:
                log(f"{signal.Signals(signum).name}: asking every process to finish its step and save a checkpoint")
            forward_stop(proc, signum)

        previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
                continue
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return rc


# --- the next plan after an out-of-memory error ------------------------------------------------



def next_plan(plan: Plan, run_dir: str | Path, shape=None, measured_peak: int | None = None) -> dict[str, Any]:
    """The smallest change to ``plan`` that the advisor says fits, as overrides and a command line:
    advisor.service.smaller_plan's ladder, on the real device's memory on CUDA (else hardware.gpu's),
    below what the failed plan needed (its measured peak, or 80% of its estimate: the plan that failed
    evidently did not fit, whatever its estimate said)."""
    from advisor import service

    if shape is None:
        shape = service.model_shape(plan.model.ref, plan.model.revision, plan.model.trust_remote_code)
    current = service.expected_peak(plan, shape)
    limit = min(x for x in (0.8 * current, measured_peak * 0.9 if measured_peak else None) if x)
    found = service.smaller_plan(plan, shape, _capacity(plan), limit)
    if found is None:
        return {"command": None, "changes": {}, "note": "no variant of this plan fits; try a smaller model, a bigger "
                "GPU or more GPUs (`tuneplan recommend`)"}
    changes = found["changes"]
    overrides = [f"{k}={_yaml_scalar(v)}" for k, v in changes.items()]
    cmd = ["tuneplan", "run", str(Path(run_dir) / "plan.yaml"), *overrides, "--run-dir",
           str(Path(run_dir).with_name(Path(run_dir).name + "-retry"))]
    return {"command": format_command(cmd), "changes": dict(changes), "predicted_peak_reserved": found["need_bytes"],
            "limit_bytes": int(limit)}


def _capacity(plan: Plan) -> int | None:
    torch = sys.modules.get("torch")
    if plan.hardware.device == "cuda" and torch is not None:
        try:
            if torch.cuda.is_available():
                return int(torch.cuda.get_device_properties(0).total_memory)
        except Exception:
            pass
    from advisor.service import gpu_memory

    return gpu_memory(plan.hardware.gpu)


def _yaml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)
