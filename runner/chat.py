"""`tuneplan chat RUN_DIR`: talk to the tuned model (and the base beside it) with the run's own prompt format.

The API a front end uses (the CLI below, a TUI screen in a worker thread)::

    from runner.chat import ChatSession, Sampling
    from runner.tuned import load_models, open_run

    models = load_models(open_run("runs/demo-run"), device="auto")   # loads once (seconds)
    chat = ChatSession(models, Sampling(max_new_tokens=128))
    for chunk in chat.stream("What is the capital of France?", which="tuned"):
        print(chunk, end="", flush=True)                              # text as it is generated
    chat.last_stats          # ReplyStats: new_tokens, seconds, tokens_per_s, first_token_s, stop, memory
    chat.stream("...", which="base")                                  # the same prompt to the base model

``stream`` is a generator: generation runs in a background thread (transformers'
``TextIteratorStreamer``); closing the generator early (``break``, ``.close()``) stops the generation
at the next token. One reply at a time per session; each model keeps its own history (``messages``
data is multi-turn; the other formats trained on one prompt at a time, so only the last message is
sent). Greedy by default; with a temperature, ``seed`` makes base and tuned draw the same numbers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from runner.prompts import prompt_ids
from runner.tuned import Models, memory_now


@dataclass
class Sampling:
    """How replies are drawn: greedy when ``temperature`` is 0 (the default)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature <= 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None}


@dataclass
class ReplyStats:
    """One reply: tokens generated, wall time, speed, why it stopped, memory after it (bytes)."""

    which: str
    prompt_tokens: int
    new_tokens: int = 0
    seconds: float = 0.0
    first_token_s: float | None = None
    stop: str = "eos"  # "eos" (the model ended its turn), "length" (max_new_tokens), "stopped" (closed early)
    weights_bytes: int = 0
    memory: dict[str, int | None] = field(default_factory=dict)  # rss, rss_peak, cuda_peak

    @property
    def tokens_per_s(self) -> float | None:
        return self.new_tokens / self.seconds if self.seconds > 0 and self.new_tokens else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


class ChatSession:
    """A conversation with the run's tuned model and its base (see the module doc)."""

    def __init__(self, models: Models, sampling: Sampling | None = None, system: str | None = None):
        run = models.run
        if run.data_format is None:
            from advisor.problems import UserError

            raise UserError(f"cannot tell which prompt format {run.run_dir} trained with (no start event in "
                            "events.jsonl and its data file is gone)")
        self.models = models
        self.sampling = sampling or Sampling()
        self.system = system
        self.format = run.data_format
        self.template = run.resolved_template(models.tokenizer)
        self.history: dict[str, list[dict]] = {"tuned": [], "base": []}
        self.last_stats: ReplyStats | None = None

    @property
    def multi_turn(self) -> bool:
        return self.format == "messages"

    def reset(self) -> None:
        self.history = {"tuned": [], "base": []}

    def messages(self, text: str, which: str) -> list[dict]:
        msgs = list(self.history[which]) if self.multi_turn else []
        if self.system and self.format == "messages" and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.system})
        return [*msgs, {"role": "user", "content": text}]

    def prompt_ids(self, text: str, which: str = "tuned") -> list[int]:
        return prompt_ids(self.models.tokenizer, self.format, self.template, self.messages(text, which))

    def stream(self, text: str, which: str = "tuned", remember: bool = True) -> Iterator[str]:
        """Text chunks of the reply of ``which`` ("tuned" or "base") to ``text``; then ``last_stats``."""
        msgs = self.messages(text, which)
        ids = prompt_ids(self.models.tokenizer, self.format, self.template, msgs)
        pieces: list[str] = []
        for chunk in generate_stream(self.models, ids, which, self.sampling, self._set_stats):
            pieces.append(chunk)
            yield chunk
        if remember and self.multi_turn:
            self.history[which] = [*msgs, {"role": "assistant", "content": "".join(pieces).strip()}]

    def reply(self, text: str, which: str = "tuned") -> str:
        """The whole reply at once (no streaming)."""
        return "".join(self.stream(text, which))

    def _set_stats(self, stats: ReplyStats) -> None:
        self.last_stats = stats


def prompt_problem(session: ChatSession, text: str, which: str = "tuned") -> str | None:
    """Why the session's model cannot answer ``text`` whole: the prompt (with the conversation so far) and the
    max new tokens asked for go beyond the model's positions (max_position_embeddings), where generate warns
    and the replies turn to noise; None when it fits. `tuneplan chat` and the app's Chat screen say it alike."""
    n = len(session.prompt_ids(text, which))
    m = session.sampling.max_new_tokens
    cfg = session.models.tuned.config
    limit = getattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, "max_position_embeddings",
                    None)
    if not isinstance(limit, int) or n + m <= limit:
        return None
    fix = "shorten the message" + (" or start the conversation again (/reset)" if session.multi_turn else "")
    if n < limit:
        return (f"the prompt is {n:,} tokens and up to {m:,} new ones are asked for: {n + m:,}, beyond the model's "
                f"{limit:,} positions; {fix}, or ask for at most {limit - n:,} new tokens")
    return f"the prompt alone is {n:,} tokens, beyond the model's {limit:,} positions; {fix}"


def eos_ids(models: Models) -> list[int]:
    """Every token that ends a turn: the tokenizer's EOS and the model's generation config's."""
    ids: list[int] = []
    for src in (models.tokenizer.eos_token_id, getattr(models.tuned.generation_config, "eos_token_id", None)):
        for i in (src if isinstance(src, list) else [src]):
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def generate_stream(models: Models, ids: list[int], which: str, sampling: Sampling,
                    on_stats=None) -> Iterator[str]:
    """Generate from prompt ``ids`` with model ``which``, yielding text as it comes; ``on_stats(ReplyStats)``
    at the end (also when the consumer stops early)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    tok = models.tokenizer
    eos = eos_ids(models)
    stats = ReplyStats(which=which, prompt_tokens=len(ids))

    class Streamer(TextIteratorStreamer):
        last: int | None = None

        def put(self, value):
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                if stats.first_token_s is None:
                    stats.first_token_s = time.perf_counter() - t0
                stats.new_tokens += int(value.numel())
                self.last = int(value.reshape(-1)[-1])
            super().put(value)

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    streamer = Streamer(tok, skip_prompt=True, skip_special_tokens=True)
    stop = threading.Event()
    errors: list[BaseException] = []
    input_ids = torch.tensor([ids], device=models.device)

    def work() -> None:
        try:
            with models.use(which) as model, torch.inference_mode(), models.autocast():
                model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                               max_new_tokens=sampling.max_new_tokens, streamer=streamer, eos_token_id=eos,
                               pad_token_id=tok.pad_token_id, stopping_criteria=StoppingCriteriaList([Stop()]),
                               **sampling.generate_kwargs())
        except BaseException as e:  # noqa: BLE001 - handed to the consumer's thread below
            errors.append(e)
            streamer.end()

    torch.manual_seed(sampling.seed)  # the same draws for base and tuned (the global generator)
    t0 = time.perf_counter()
    th = threading.Thread(target=work, name="tuneplan-generate", daemon=True)
    th.start()
    finished = False
    try:
        for chunk in streamer:
            if chunk:
                yield chunk
        finished = True
    finally:
        stop.set()
        th.join()
        stats.seconds = time.perf_counter() - t0
        if errors:
            stats.stop = "error"
        elif streamer.last in eos:
            stats.stop = "eos"
        elif stats.new_tokens >= sampling.max_new_tokens:
            stats.stop = "length"
        elif not finished:
            stats.stop = "stopped"
        stats.weights_bytes = models.weights_bytes()
        stats.memory = memory_now(models.device)
        if on_stats is not None:
            on_stats(stats)
    if errors:
        raise errors[0]
