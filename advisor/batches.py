"""The job and the longest batch from the data's real lengths, batched as the runner batches them.

Headless and pure (no torch, no tokenizer): it takes the lengths the runner's data loader produces
(``runner.data.measure``, reached through ``runner.api.data_lengths``: the training sequences after the
split and the packing, in the runner's order) and replays ``runner.recipe``'s batching on them:

* the number of steps: ``per_rank = examples // processes``, ``batches_per_epoch = ceil(per_rank /
  micro_batch)``, ``steps = run.max_steps or max(1, ceil(epochs x batches_per_epoch / grad_accum))``
  (``Recipe._setup_data``);
* micro-batch ``position`` of process ``rank``: epoch ``position // batches_per_epoch`` shuffles the
  examples with ``random.Random(seed x 1000003 + epoch)``, the process takes ``order[rank::processes]
  [:per_rank]`` and the ``micro_batch`` examples at ``(position % batches_per_epoch) x micro_batch``
  (``Recipe._micro_batch``); each step takes ``grad_accum`` micro-batches;
* a micro-batch is padded to its longest sequence, or to ``training.seq_len`` with
  ``data.pad_to=seq_len`` (``runner.data.collate``); its tokens are the real ones (the attention mask),
  its positions the padded ones; a step event counts process 0's tokens x processes (``Recipe.train``);
* the longest batch is the ``micro_batch`` longest sequences, padded as the run pads
  (``runner.failfast.longest_batch``, what the fail-fast probe runs before step 1).

tests/test_data_estimate.py checks every number against the runner's own code and a real run's events.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from advisor.problems import Problem, Problems

if TYPE_CHECKING:
    from advisor.gpus import Gpu
    from advisor.model import ModelShape
    from advisor.spec import Plan
    from advisor.throughput import JobTime


@dataclass(frozen=True)
class DataLengths:
    """The data as the runner's loader sees it, in lengths: ``train`` the training sequences in the
    runner's order (after the split and, with data.packing, the packing), ``lines`` the record line of
    each; ``lengths`` every kept example (train and validation) for the statistics."""

    train: tuple[int, ...]
    lines: tuple[int, ...]
    val: int  # validation sequences
    examples: int  # training examples (before packing)
    trained_tokens: int
    records: int
    truncated: int
    skipped: int
    format: str
    template: str
    source: str  # what counted the tokens: the model's tokenizer, or the approximation and why
    exact: bool  # False: an approximation without the tokenizer
    path: str = ""
    warnings: tuple[str, ...] = ()
    lengths: tuple[int, ...] = ()

    def stats(self) -> dict[str, float]:
        """count, min, mean, median, p95, max of the examples' tokens (as `data check` shows them)."""
        s = sorted(self.lengths or self.train)
        if not s:
            return {"count": 0}
        return {"count": len(s), "min": s[0], "mean": round(statistics.fmean(s), 1), "median": statistics.median(s),
                "p95": s[min(len(s) - 1, int(0.95 * len(s)))], "max": s[-1]}


@dataclass(frozen=True)
class LongestBatch:
    """The micro-batch the fail-fast probe runs (runner.failfast.longest_batch): ``rows`` sequences padded to
    ``length``; ``lines`` are their record numbers in the data file."""

    rows: int
    length: int
    lines: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return self.rows * self.length

    def words(self) -> str:
        where = ", ".join(str(n) for n in self.lines[:4]) + (", ..." if len(self.lines) > 4 else "")
        return f"{self.rows} x {self.length} tokens (line{'s' if len(self.lines) > 1 else ''} {where})"


@dataclass(frozen=True)
class DataJob:
    """The run the data makes: steps, tokens (real) and positions (padded) over every process, the
    step events' token counts, process 0's micro-batch shapes in order, and the longest batch."""

    steps: int
    micro_batches: int  # per process
    processes: int
    batches_per_epoch: int
    examples: int  # training examples (before packing)
    sequences: int  # training sequences (packs with data.packing)
    tokens: int  # real tokens trained on, every process
    positions: int  # padded positions computed, every process
    epoch_tokens: int  # real tokens of one pass over the training sequences
    step_tokens: tuple[int, ...]  # per step, as the runner's step events count them (process 0 x processes)
    shapes: tuple[tuple[int, int], ...]  # process 0's micro-batches (rows, padded length), in order
    longest: LongestBatch
    seconds: float | None = None  # the job's time from the time model, every step's slowest process
    notes: tuple[str, ...] = ()

    @property
    def epochs(self) -> float:
        """Passes over the data the steps make (run.max_steps can make it other than run.epochs)."""
        return self.micro_batches / self.batches_per_epoch

    @property
    def positions_per_token(self) -> float:
        return self.positions / max(self.tokens, 1)

    @property
    def avg_tokens(self) -> int:
        """Mean real tokens per training example, rounded (the plan's job.avg_tokens)."""
        return max(1, round(self.epoch_tokens / max(self.examples, 1)))

    def plan_values(self) -> dict[str, dict[str, Any]]:
        """The data's numbers as the plan's job fields (job.examples, job.avg_tokens)."""
        return {"job": {"examples": self.examples, "avg_tokens": self.avg_tokens}}

    def as_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "micro_batches_per_process": self.micro_batches, "processes": self.processes,
                "epochs": round(self.epochs, 4), "examples": self.examples, "sequences": self.sequences,
                "tokens": self.tokens, "positions": self.positions,
                "positions_per_token": round(self.positions_per_token, 4), "avg_tokens": self.avg_tokens,
                "longest": {"rows": self.longest.rows, "length": self.longest.length, "tokens": self.longest.tokens,
                            "lines": list(self.longest.lines)},
                "notes": list(self.notes)}


def steps_of(sequences: int, micro_batch: int, grad_accum: int, processes: int, epochs: float,
             max_steps: int | None) -> tuple[int, int, int]:
    """(per_rank, batches_per_epoch, steps) as Recipe._setup_data counts them; Problems when there are
    fewer sequences than processes."""
    per_rank = sequences // processes
    if per_rank < 1:
        raise Problems(Problem(f"{sequences} training examples cannot feed {processes} processes", "data.path",
                               "use more data, fewer GPUs, or a smaller data.val_split"))
    per_epoch = math.ceil(per_rank / micro_batch)
    steps = max_steps if max_steps else max(1, math.ceil(epochs * per_epoch / grad_accum))
    return per_rank, per_epoch, steps


class _Stream:
    """Recipe._micro_batch's index lists for one process, position after position."""

    def __init__(self, n: int, per_rank: int, per_epoch: int, micro_batch: int, rank: int, processes: int, seed: int):
        self.n, self.per_rank, self.per_epoch, self.mb = n, per_rank, per_epoch, micro_batch
        self.rank, self.processes, self.seed = rank, processes, seed
        self._epoch: int | None = None
        self._mine: list[int] = []

    def batch(self, position: int) -> list[int]:
        epoch, k = divmod(position, self.per_epoch)
        if epoch != self._epoch:
            order = list(range(self.n))
            random.Random(self.seed * 1000003 + epoch).shuffle(order)
            self._mine = order[self.rank::self.processes][: self.per_rank]
            self._epoch = epoch
        return self._mine[k * self.mb:(k + 1) * self.mb]


def longest_batch(train: Sequence[int], lines: Sequence[int], micro_batch: int, pad_to: int | None) -> LongestBatch:
    """runner.failfast.longest_batch on lengths: the micro_batch longest (ties: the earlier first)."""
    chosen = sorted(range(len(train)), key=lambda i: train[i], reverse=True)[:micro_batch]
    length = pad_to or max(train[i] for i in chosen)
    return LongestBatch(len(chosen), length, tuple(lines[i] for i in chosen))


def data_job(plan: Plan, data: DataLengths, micro_seconds=None, fixed_seconds: float = 0.0) -> DataJob:
    """Replay the runner's batching on the data (module docstring). ``micro_seconds(rows, length)``: the
    time model's seconds for one micro-batch of that shape; with it, the job's seconds are the sum over
    steps of the slowest process's micro-batches plus ``fixed_seconds`` (the optimizer step)."""
    t, hw = plan.training, plan.hardware
    world = hw.gpus
    n = len(data.train)
    per_rank, per_epoch, steps = steps_of(n, t.micro_batch, t.grad_accum, world, plan.run.epochs, plan.run.max_steps)
    pad_to = t.seq_len if plan.data.pad_to == "seq_len" else None
    streams = [_Stream(n, per_rank, per_epoch, t.micro_batch, r, world, plan.run.seed) for r in range(world)]
    train = data.train
    tokens = positions = 0
    step_tokens: list[int] = []
    shapes: list[tuple[int, int]] = []
    seconds = 0.0 if micro_seconds is not None else None
    position = 0
    for _ in range(steps):
        slowest = 0.0
        rank0 = 0
        for r, stream in enumerate(streams):
            busy = 0.0
            for i in range(t.grad_accum):
                idx = stream.batch(position + i)
                lens = [train[j] for j in idx]
                real = sum(lens)
                length = pad_to or max(lens)
                tokens += real
                positions += len(lens) * length
                if r == 0:
                    rank0 += real
                    shapes.append((len(lens), length))
                if micro_seconds is not None:
                    busy += micro_seconds(len(lens), length)
            slowest = max(slowest, busy)
        if seconds is not None:
            seconds += slowest + fixed_seconds
        step_tokens.append(rank0 * world)
        position += t.grad_accum
    notes = []
    if world > 1 and n % world:
        notes.append(f"{n % world} of {n} training sequences are left out each epoch: each of the {world} processes "
                     f"takes {per_rank}")
    return DataJob(steps, position, world, per_epoch, data.examples, n, tokens, positions, sum(train),
                   tuple(step_tokens), tuple(shapes), longest_batch(train, data.lines, t.micro_batch, pad_to),
                   seconds, tuple(notes))


# --- time: the time model over the data's real batch shapes ------------------------------------------

GRID = 64  # micro-batch lengths the time model is evaluated at (linear in between)


class MicroSeconds:
    """Seconds of one micro-batch of (rows, length) from the time model (advisor.throughput.step_time):
    a step of 2 micro-batches less a step of 1, which leaves the optimizer step and the gradient
    communication of a step out (``fixed``). Evaluated at up to GRID lengths per row count, linear
    in between (step_time is smooth in the length)."""

    def __init__(self, plan: Plan, shape: ModelShape, gpu: Gpu, lengths: Sequence[int]):
        self.plan, self.shape, self.gpu = plan, shape, gpu
        ls = sorted(set(lengths) | {plan.training.seq_len})
        if len(ls) > GRID:
            lo, hi = ls[0], ls[-1]
            ls = sorted({round(lo + (hi - lo) * k / (GRID - 1)) for k in range(GRID)})
        self.grid = ls
        self.table: dict[int, list[float]] = {}
        t = plan.training
        self.fixed = self._step(t.micro_batch, t.seq_len, 1) - self._micro(t.micro_batch, t.seq_len)

    def _step(self, rows: int, length: int, accum: int) -> float:
        from advisor.throughput import step_time

        t = self.plan.training.model_copy(update={"micro_batch": rows, "seq_len": length, "grad_accum": accum})
        return step_time(self.plan.model_copy(update={"training": t}), self.shape, self.gpu).step_s

    def _micro(self, rows: int, length: int) -> float:
        return self._step(rows, length, 2) - self._step(rows, length, 1)

    def __call__(self, rows: int, length: int) -> float:
        row = self.table.get(rows)
        if row is None:
            row = self.table[rows] = [self._micro(rows, x) for x in self.grid]
        g = self.grid
        i = min(max(1, _bisect(g, length)), len(g) - 1)
        x0, x1 = g[i - 1], g[i]
        w = 0.0 if x1 == x0 else (length - x0) / (x1 - x0)
        return row[i - 1] + w * (row[i] - row[i - 1])


def _bisect(a: list[int], x: int) -> int:
    import bisect

    return bisect.bisect_left(a, x)


def data_job_time(plan: Plan, shape: ModelShape, gpu: Gpu, dj: DataJob) -> JobTime:
    """The time model's JobTime for the data's job: its exact steps and tokens, every micro-batch timed
    at its own padded shape (the slowest process of each step), the range and price as job_time has them."""
    from advisor.throughput import JobTime, assumptions_line, priced, step_time, time_range

    rng = time_range(plan, shape, gpu)
    n = plan.hardware.gpus
    secs = dj.seconds or 0.0
    hours = secs / 3600
    h_low, h_high, price, cost, c_lo, c_hi, note = priced(hours, rng, gpu, n)
    nominal = step_time(plan, shape, gpu)
    step_s = secs / max(dj.steps, 1)
    scale = step_s / nominal.step_s if nominal.step_s else 0.0
    parts = {k: v * scale for k, v in nominal.parts.items()}
    pad = dj.positions_per_token
    pieces = assumptions_line(plan, gpu, rng, pad).split("; ")
    if len(pieces) >= 4:  # the padding clause: here the data's own padding, counted
        pieces[3] = padding_words(plan, pad)
    return JobTime(step_s, dj.tokens / secs / n if secs else 0.0, dj.tokens, dj.steps, hours, h_low, h_high, n,
                   gpu.name, price, cost, c_lo, c_hi, note, "; ".join(pieces), parts, (rng.low, rng.high),
                   list(rng.outside), pad)


def padding_words(plan: Plan, positions_per_token: float) -> str:
    d = plan.data
    how = ("packed into sequences of at most seq_len, each batch padded to its longest" if d.packing else
           "every batch padded to seq_len" if d.pad_to == "seq_len" else "each batch padded to its longest")
    return f"the data's own batches ({how}): {positions_per_token:.3g} positions per token, counted"
