"""Shared names of the simulate package."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[float, str], None]

TRAIN_PHASES = ("forward", "backward", "optimizer", "zero_grad")
INFER_PHASES = ("prefill", "decode")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
EXTRAPOLATE_FROM = (2, 3, 4)  # depths simulated to find the per-layer increment
DECODE_STEPS_FULL = 32  # up to this many generated tokens every decode step runs; beyond, see _infer


class SimulateError(ValueError):
    """The architecture or the settings cannot be simulated, with what to use instead."""
