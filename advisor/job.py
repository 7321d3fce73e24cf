"""The job a fine-tune chews through, as the plan carries it: ``job.examples`` x ``job.avg_tokens`` x
``run.epochs``, the target effective batch and an optional budget (advisor.spec.JobSpec). :class:`Job`
is that value for the time and cost models; its numbers are checked once, by the plan's schema
(:func:`job_problems` asks it), so the CLI's flags, the app's fields and a plan file agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from advisor.problems import Problem, Problems
from advisor.spec import JobSpec, RunSpec

if TYPE_CHECKING:
    from advisor.spec import Plan

DEFAULT_EXAMPLES: int = JobSpec.model_fields["examples"].default
DEFAULT_AVG_TOKENS: int = JobSpec.model_fields["avg_tokens"].default
DEFAULT_TARGET_BATCH: int = JobSpec.model_fields["target_batch"].default
DEFAULT_EPOCHS: float = RunSpec.model_fields["epochs"].default
DEFAULT_SEQ = 2048

# the job's plan fields: where each number lives in a plan (and its problems' field)
FIELDS = {"examples": "job.examples", "avg_tokens": "job.avg_tokens", "epochs": "run.epochs",
          "target_batch": "job.target_batch", "budget_usd": "job.budget_usd"}


_FIX = {"job.examples": "the number of training examples", "job.avg_tokens": "the mean tokens per example",
        "run.epochs": "1-3 is usual", "job.target_batch": "the target effective batch, e.g. 16",
        "job.budget_usd": "leave it out for no limit"}


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

    @classmethod
    def of(cls, plan: Plan) -> Job:
        """The plan's job (job.* and run.epochs)."""
        j = plan.job
        return cls(j.examples, j.avg_tokens, plan.run.epochs, j.target_batch, j.budget_usd)

    def plan_values(self) -> dict[str, dict[str, Any]]:
        """The job as plan sections, to merge into a plan dict (``{"job": {...}, "run": {"epochs": ...}}``)."""
        return {"job": {"examples": self.examples, "avg_tokens": self.avg_tokens, "target_batch": self.target_batch,
                        "budget_usd": self.budget_usd}, "run": {"epochs": self.epochs}}


def job_problems(examples: Any, avg_tokens: Any, epochs: Any, target_batch: Any = DEFAULT_TARGET_BATCH,
                 budget_usd: Any = None, gpus: Any = None) -> list[Problem]:
    """Every problem with the job's numbers, as the plan's schema finds them (fields job.* and
    run.epochs; the CLI shows them as its flags, the app on its fields). ``gpus``: recommend's GPU
    count (job.gpus), which is a question, not a plan field."""
    from advisor.spec import SpecError, build_plan

    values = {"job": {"examples": examples, "avg_tokens": avg_tokens, "target_batch": target_batch,
                      "budget_usd": budget_usd}, "run": {"epochs": epochs}}
    out: list[Problem] = []
    try:
        build_plan(values)
    except SpecError as e:
        out += [Problem(p.what, p.field, p.fix or _FIX.get(p.field or "")) for p in e.items]
    if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int) or not 1 <= gpus <= 4096):
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
