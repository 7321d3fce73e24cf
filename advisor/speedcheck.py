"""The time model's prediction for a run that is training: the card it is on and the seconds the model
gives one optimizer step of the batch shape the run computed.

``speed_prediction`` is what the runner asks for (runner/speed.py, through advisor.service): it finds the
card's GPU profile (its CUDA name first, the plan's GPU second) and predicts the step at the run's mean
padded length per sequence, not the plan's seq_len (batches padded to their longest are shorter), on the
number of processes that run, so that the run compares like with like. Pure arithmetic (no torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from advisor.gpus import Gpu
    from advisor.model import ModelShape
    from advisor.spec import Plan


def find_card(device_name: str | None, plan_gpu: str | None) -> tuple[Gpu | None, str | None]:
    """The GPU profile of the card the run is on (its CUDA name first, the plan's GPU second), and a note
    when the card has no profile of its own."""
    from advisor.gpus import GpuError, find_gpu

    for name in (device_name, plan_gpu):
        if not name:
            continue
        try:
            g = find_gpu(name)
        except GpuError:
            continue
        if name is plan_gpu and device_name:
            return g, f"{device_name} has no GPU profile; predicted for the plan's {g.name}"
        return g, None
    who = device_name or plan_gpu
    return None, (f"no GPU profile for {who}: measured only" if who else "no GPU named: measured only")


def speed_prediction(plan: Plan, shape: ModelShape | None, device_name: str | None, positions_per_seq: float,
                     world: int = 1) -> dict[str, Any]:
    """{gpu, price_usd_hour, step_s, seq_len, note}: the model's seconds per optimizer step for `world`
    processes computing `positions_per_seq` positions per sequence (step_s None when there is no card
    profile or no model shape; note says why)."""
    from advisor.throughput import step_time

    gpu, note = find_card(device_name, plan.hardware.gpu)
    out: dict[str, Any] = {"gpu": gpu.name if gpu else None, "price_usd_hour": gpu.price_usd_hour if gpu else None,
                           "step_s": None, "seq_len": None, "note": note}
    if gpu is None or shape is None:
        out["note"] = note or "no model shape for a prediction: measured only"
        return out
    t = plan.training
    seq = max(1, round(positions_per_seq))
    shaped = plan.model_copy(update={"training": t.model_copy(update={"seq_len": seq}),
                                     "hardware": plan.hardware.model_copy(update={"gpus": max(1, world)})})
    st = step_time(shaped, shape, gpu)
    # the model's seconds for a step of this shape, scaled to the positions the run computed
    out["step_s"] = st.step_s * (positions_per_seq / seq)
    out["seq_len"] = seq
    return out
