"""Every run checks the time model: its measured speed after warm-up against the prediction, and the job
re-projected from the measured speed.

``SpeedMeter.add`` takes each optimizer step's wall time, real tokens and computed positions (over all
processes). The first ``WARMUP_STEPS`` are skipped (CUDA context and kernel selection, the allocator
growing its pool, lazy initialisation); from then on every step returns the check (``check``): the
median step time of the steps measured so far (evaluation and checkpoints are outside the step),
tokens/s, the time model's prediction for the same batch shape (advisor.speedcheck through the
service), the whole job's time and cost at both speeds, and one line of ``words``: "predicted 953
tokens/s, measured 1,020, x1.07: the job (190 steps) takes 25 min, not 27 min". The recipe puts it in
the step event (key ``speed``) and report.json; the console and the app show ``words``.

Like with like: the prediction is for the mean padded length the run computed, and both speeds count
the same real tokens (padding excluded). On the CPU the GPU time model does not apply: the check
reports what it measured and says so.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from advisor.units import duration

WARMUP_STEPS = 2


def _prediction(plan, shape, device_name: str | None, per_seq: float, world: int) -> dict[str, Any]:
    """The time model's step for this run (advisor.speedcheck.speed_prediction, reached through the service)."""
    from advisor.service import speed_prediction

    return speed_prediction(plan, shape, device_name, per_seq, world)


class SpeedMeter:
    def __init__(self, plan, shape, device: str, device_name: str | None, world: int, total_steps: int,
                 warmup_steps: int = WARMUP_STEPS):
        self.plan, self.shape, self.world, self.total_steps = plan, shape, max(1, world), total_steps
        self.device = "cuda" if str(device).startswith("cuda") else "cpu"
        self.device_name = device_name
        self.warmup_steps = warmup_steps
        self.seen = 0
        self.seconds: list[float] = []
        self.tokens = 0
        self.positions = 0
        self.last: dict[str, Any] | None = None

    def add(self, seconds: float, tokens: int, positions: int) -> dict[str, Any] | None:
        """Record one optimizer step; the check once warm-up is over (None before)."""
        self.seen += 1
        if self.seen <= self.warmup_steps or seconds <= 0:
            return None
        self.seconds.append(seconds)
        self.tokens += tokens
        self.positions += positions
        n = len(self.seconds)
        tokens_step, positions_step = self.tokens / n, self.positions / n
        pred = None
        if self.device == "cuda":
            t = self.plan.training
            per_seq = positions_step / self.world / (t.grad_accum * t.micro_batch)
            pred = _prediction(self.plan, self.shape, self.device_name, per_seq, self.world)
        self.last = check(statistics.median(self.seconds), tokens_step, positions_step, steps_measured=n,
                          warmup_steps=self.warmup_steps, total_steps=self.total_steps, world=self.world,
                          device=self.device, prediction=pred)
        return self.last

    def summary(self) -> dict[str, Any] | None:
        """The latest check, or why there is none (too few steps after warm-up)."""
        if self.last is not None:
            return self.last
        return {"device": self.device, "measured": None, "predicted": None,
                "words": f"no speed check: the run took {self.seen} step{'s' if self.seen != 1 else ''}, all of them "
                         f"warm-up (the first {self.warmup_steps} are not measured)"}


def check(step_s: float, tokens_per_step: float, positions_per_step: float, *, steps_measured: int,
          warmup_steps: int, total_steps: int, world: int = 1, device: str = "cpu",
          prediction: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measured against predicted speed, and the job (total_steps optimizer steps) at both speeds.

    ``tokens_per_step``: real tokens of one optimizer step over all processes; ``positions_per_step``:
    the positions computed for them (padding included); ``step_s``: measured seconds per step (steady
    state); ``prediction``: advisor.speedcheck.speed_prediction's mapping (None on the CPU)."""
    world = max(1, world)
    measured = {"step_s": round(step_s, 4), "tokens_per_s_per_gpu": round(tokens_per_step / step_s / world, 2),
                "positions_per_s_per_gpu": round(positions_per_step / step_s / world, 2),
                "padding_share": round(1 - tokens_per_step / positions_per_step, 4) if positions_per_step else 0.0,
                "steps_measured": steps_measured, "warmup_steps": warmup_steps}
    hours_measured = total_steps * step_s / 3600
    pred = prediction or {}
    out: dict[str, Any] = {"device": device, "gpus": world, "gpu": pred.get("gpu"), "measured": measured,
                           "predicted": None, "ratio": None,
                           "job": {"total_steps": total_steps, "hours_measured": round(hours_measured, 6),
                                   "hours_predicted": None, "cost_measured_usd": None, "cost_predicted_usd": None,
                                   "price_usd_hour": None},
                           "note": pred.get("note")}
    if device != "cuda":
        out["note"] = "the GPU time model does not apply on the CPU: measured only"
    elif pred.get("step_s"):
        pred_s = float(pred["step_s"])
        out["predicted"] = {"step_s": round(pred_s, 4), "seq_len": pred.get("seq_len"),
                            "tokens_per_s_per_gpu": round(tokens_per_step / pred_s / world, 2)}
        out["ratio"] = round(pred_s / step_s, 3)  # measured tokens/s over predicted
        out["job"]["hours_predicted"] = round(total_steps * pred_s / 3600, 6)
        price = pred.get("price_usd_hour")
        if price is not None:
            out["job"]["price_usd_hour"] = price
            out["job"]["cost_measured_usd"] = round(hours_measured * world * price, 2)
            out["job"]["cost_predicted_usd"] = round(total_steps * pred_s / 3600 * world * price, 2)
    out["words"] = words(out)
    return out


def _hours(h: float) -> str:
    """A job time for the words: seconds under a minute, else advisor.units.duration."""
    return f"{h * 3600:.0f} s" if h * 60 < 1 else duration(h)


def words(speed: dict[str, Any]) -> str:
    """One line: 'predicted 953 tokens/s, measured 1,020, x1.07: the job (190 steps) takes 25 min, not 27 min'."""
    m, p, job = speed["measured"], speed.get("predicted"), speed["job"]
    per = " per GPU" if speed.get("gpus", 1) > 1 else ""
    steps = f"{job['total_steps']:,} steps"
    if p is None:
        where = "on the CPU" if speed.get("device") != "cuda" else f"on {speed.get('gpu') or 'this GPU'}"
        line = (f"measured {m['tokens_per_s_per_gpu']:,.0f} tokens/s{per} ({m['step_s']:.3g} s per step) {where}: "
                f"the job ({steps}) takes about {_hours(job['hours_measured'])} at this speed")
        return line + (f" ({speed['note']})" if speed.get("note") else "")
    a, b = _hours(job["hours_measured"]), _hours(job["hours_predicted"])
    takes = f"the job ({steps}) takes {a}" + ("" if a == b else f", not {b}")
    if job.get("cost_measured_usd") is not None:
        ca, cb = f"${job['cost_measured_usd']:,.2f}", f"${job['cost_predicted_usd']:,.2f}"
        takes += f" ({ca}" + ("" if ca == cb else f", not {cb}") + ")"
    ratio = speed.get("ratio")
    off = "" if ratio is None or math.isclose(ratio, 1.0, abs_tol=0.005) else f", x{ratio:.2f}"
    line = (f"predicted {p['tokens_per_s_per_gpu']:,.0f} tokens/s{per}, measured {m['tokens_per_s_per_gpu']:,.0f}"
            f"{off}: {takes}")
    return line + (f" ({speed['note']})" if speed.get("note") else "")


def device_name(device: str) -> str | None:
    """The CUDA device's name ("NVIDIA A100-SXM4-80GB"), None on the CPU."""
    if not str(device).startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_name(torch.device(device))
