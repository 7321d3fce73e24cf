"""The job a fine-tune chews through: examples x tokens per example x epochs, the target effective
batch and an optional budget; and the one check of those numbers (fields job.*, shown by the CLI as
its flags, by the TUI on the advice screen's fields)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from advisor.problems import Problem, Problems

DEFAULT_EXAMPLES = 1000
DEFAULT_AVG_TOKENS = 512
DEFAULT_EPOCHS = 3.0
DEFAULT_TARGET_BATCH = 16
DEFAULT_SEQ = 2048


@dataclass(frozen=True)
class Job:
    """What the fine-tune will chew through: examples x tokens per example x epochs, the target
    effective batch, and an optional budget."""

    examples: int = DEFAULT_EXAMPLES
    avg_tokens: int = DEFAULT_AVG_TOKENS
    epochs: float = DEFAULT_EPOCHS
    target_batch: int = DEFAULT_TARGET_BATCH
    budget_usd: float | None = None

    @property
    def tokens(self) -> float:
        return float(self.examples) * self.avg_tokens * self.epochs


def job_problems(examples: Any, avg_tokens: Any, epochs: Any, target_batch: Any = DEFAULT_TARGET_BATCH,
                 budget_usd: Any = None, gpus: Any = None) -> list[Problem]:
    """Every problem with the job's numbers (fields job.*; the CLI shows them as flags)."""

    def number(v: Any, kind: type) -> float | None:
        if isinstance(v, bool) or (kind is int and isinstance(v, float) and not v.is_integer()):
            return None
        try:
            x = kind(v)
        except (TypeError, ValueError, OverflowError):
            return None
        return x if math.isfinite(x) else None

    out = []
    ex, tok, ep, tb = (number(examples, int), number(avg_tokens, int), number(epochs, float),
                       number(target_batch, int))
    if ex is None or ex < 1:
        out.append(Problem(f"must be at least 1, a whole number (got {examples!r})", "job.examples",
                           "the number of training examples"))
    if tok is None or tok < 1:
        out.append(Problem(f"must be at least 1, a whole number (got {avg_tokens!r})", "job.avg_tokens",
                           "the mean tokens per example"))
    if ep is None or not 0 < ep <= 1000:
        out.append(Problem(f"must be a finite number above 0 and at most 1000 (got {epochs!r})", "job.epochs",
                           "1-3 is usual"))
    if tb is None or tb < 1:
        out.append(Problem(f"must be at least 1, a whole number (got {target_batch!r})", "job.target_batch",
                           "the target effective batch, e.g. 16"))
    if budget_usd is not None:
        b = number(budget_usd, float)
        if b is None or b <= 0:
            out.append(Problem(f"must be a positive amount of US dollars (got {budget_usd!r})", "job.budget_usd",
                               "leave it out for no limit"))
    if gpus is not None:
        g = number(gpus, int)
        if g is None or not 1 <= g <= 4096:
            out.append(Problem(f"must be between 1 and 4096 (got {gpus!r})", "job.gpus",
                               "leave it out to let tuneplan choose"))
    return out


def make_job(examples: Any = DEFAULT_EXAMPLES, avg_tokens: Any = DEFAULT_AVG_TOKENS, epochs: Any = DEFAULT_EPOCHS,
             target_batch: Any = DEFAULT_TARGET_BATCH, budget_usd: Any = None) -> Job:
    problems = job_problems(examples, avg_tokens, epochs, target_batch, budget_usd)
    if problems:
        raise Problems(problems)
    return Job(int(examples), int(avg_tokens), float(epochs), int(target_batch),
               None if budget_usd is None else float(budget_usd))
