"""Callbacks into the training loop, for tests and tools: :class:`Hooks`, passed to ``Recipe(hooks=...)``.

In a real subprocess (``python -m runner``) tests set ``TUNEPLAN_TEST_HOOKS`` instead; only
:func:`from_env` reads it (when `tuneplan run` runs the recipe), and it builds these hooks with
:meth:`Hooks.from_spec`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Recipe = Any  # runner.recipe.Recipe (not imported: the recipe imports this module)


@dataclass
class Hooks:
    """Callbacks into the loop (tests, tools). Each gets the Recipe; an exception raised in one is the
    run's, as if the step had raised it (``before_step`` with torch.OutOfMemoryError = an OOM)."""

    before_step: Callable[[Recipe], None] | None = None  # before step recipe.step + 1 runs
    after_step: Callable[[Recipe], None] | None = None  # after step recipe.step, its event written
    before_load: Callable[[Recipe], None] | None = None  # after the start event, before the model loads
    oom_above_tokens: int | None = None  # any forward of more tokens raises torch.OutOfMemoryError (runner.failfast)

    @classmethod
    def from_spec(cls, spec: str) -> Hooks:
        """``step_delay=SECONDS,oom_at_step=N,load_delay=SECONDS,oom_above_tokens=N``: sleep after every
        step (a tiny model trains too fast to be stopped midway), raise torch.OutOfMemoryError (what
        CUDA's allocator raises) before step N, sleep before the model loads (a big model's loading time,
        to signal it there), raise it in any forward of more than N tokens (a batch too long to fit).
        Unknown or malformed items are ignored (a test hook must not fail a real run)."""
        opts: dict[str, float] = {}
        for item in spec.split(","):
            k, _, v = item.partition("=")
            try:
                opts[k.strip()] = float(v)
            except ValueError:
                continue
        delay, oom_at, load = opts.get("step_delay", 0.0), int(opts.get("oom_at_step", 0)), opts.get("load_delay", 0.0)
        before = after = loading = None
        if oom_at:
            def before(r: Recipe) -> None:
                if r.step + 1 == oom_at:
                    raise r.torch.OutOfMemoryError(f"simulated at step {oom_at} (test hook): CUDA out of memory. "
                                                   "Tried to allocate 2.00 GiB")
        if delay > 0:
            def after(r: Recipe) -> None:
                time.sleep(delay)
        if load > 0:
            def loading(r: Recipe) -> None:
                time.sleep(load)
        return cls(before, after, loading, int(opts["oom_above_tokens"]) if opts.get("oom_above_tokens") else None)


TEST_HOOKS_ENV = "TUNEPLAN_TEST_HOOKS"


def from_env() -> Hooks | None:
    """Hooks from ``TUNEPLAN_TEST_HOOKS`` (a test's real subprocess: ``step_delay=0.2,oom_at_step=3``), or
    None: the one place the variable is read."""
    import os

    spec = os.environ.get(TEST_HOOKS_ENV)
    return Hooks.from_spec(spec) if spec else None
