"""Fine-tune, RAG, or just prompt? A short questionnaire and a rule-based verdict.

The rules are the practitioners' consensus collected in FIELD-NOTES.md ("Fine-tune, RAG, or just
prompt?"): start with prompting; missing, private or fast-changing knowledge -> retrieval (RAG);
wrong format, style or structure -> fine-tuning; both -> RAG first, then fine-tune. In one line:
fine-tuning is for form, RAG is for facts. No model, no network: pure and instant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Gap = Literal["knowledge", "behaviour", "both", "unsure"]
Verdict = Literal["prompt-first", "rag", "fine-tune-lora", "fine-tune-full", "rag+fine-tune"]
VERDICTS: tuple[str, ...] = ("prompt-first", "rag", "fine-tune-lora", "fine-tune-full", "rag+fine-tune")

# Example-count thresholds (labelled input/output pairs). Below MIN_FINETUNE_EXAMPLES a fine-tune
# mostly learns noise: collect data first (FIELD-NOTES: "collect ~1000 good pairs"). LoRA works from
# a few hundred examples; full fine-tuning pays off with tens of thousands (fewer invite
# overfitting and forgetting of everything else the model could do). advisor.recommend uses the
# same full-fine-tuning threshold when it weighs full against LoRA.
MIN_FINETUNE_EXAMPLES = 100
FULL_FINETUNE_EXAMPLES = 10_000


class Questionnaire(BaseModel):
    """What the user knows about the problem before choosing prompting, RAG or fine-tuning."""

    model_config = ConfigDict(extra="forbid")

    gap: Gap = Field("unsure", description="Why the model fails today: knowledge (it lacks facts: private, new or "
                     "niche), behaviour (wrong format, style, structure, or it ignores the task), both, or unsure.")
    knowledge_changes_often: bool = Field(False, description="The facts it needs change weekly or faster "
                                          "(prices, tickets, documentation).")
    must_cite_sources: bool = Field(False, description="Answers must point to the document they came from.")
    labelled_examples: int = Field(0, ge=0, description="Good input/output pairs you have (or can write) "
                                   "for training.")
    prompting_tried: bool = Field(False, description="You tried careful prompting (instructions, few-shot "
                                  "examples) and measured it on a set of test inputs.")
    latency_or_cost_limits: bool = Field(False, description="Serving latency or per-query cost is a hard "
                                         "limit (long prompts or a large model are too slow or too dear).")
    many_query_types: bool = Field(False, description="One model must keep serving many different kinds of "
                                   "requests, not just this task.")


@dataclass
class Guidance:
    verdict: str
    reasons: list[str] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert self.verdict in VERDICTS, self.verdict

    def to_json(self) -> dict:
        return asdict(self)


def _rag_steps() -> list[str]:
    return [
        ("Start with keyword retrieval (BM25) over your documents; add a vector database only if keyword "
        "search misses relevant passages."),
        "Measure retrieval on its own (is the right passage in the top 5?) before judging the answers.",
    ]


def _finetune_method(q: Questionnaire, reasons: list[str]) -> str:
    """LoRA from MIN_FINETUNE_EXAMPLES examples; full only with FULL_FINETUNE_EXAMPLES or more and
    when the model serves this task alone."""
    n = q.labelled_examples
    if n >= FULL_FINETUNE_EXAMPLES and not q.many_query_types:
        reasons.append(f"With {n:,} examples (at least {FULL_FINETUNE_EXAMPLES:,}) full fine-tuning can use the "
                       "data fully; LoRA remains the cheaper first try.")
        return "full"
    if n >= FULL_FINETUNE_EXAMPLES:
        reasons.append("The model must keep serving many kinds of requests, and full fine-tuning can hurt the "
                       "tasks it is not trained on; a LoRA adapter leaves the base weights untouched and can be "
                       "switched off.")
    else:
        reasons.append(f"{n:,} examples suit LoRA (it trains well from a few hundred); full fine-tuning pays off "
                       f"from about {FULL_FINETUNE_EXAMPLES:,}.")
    return "lora"


def _fact_reasons(q: Questionnaire) -> list[str]:
    out = []
    if q.gap in ("knowledge", "both"):
        out.append("The model lacks knowledge: retrieval puts the facts in the prompt; fine-tuning teaches "
                   "form, not facts, and a tuned model still invents what it never saw.")
    if q.knowledge_changes_often:
        out.append("The knowledge changes often: a retrieval index is updated in minutes, a fine-tuned "
                   "model would need retraining each time.")
    if q.must_cite_sources:
        out.append("Answers must cite sources: RAG can show the passages it retrieved; a fine-tuned model "
                   "cannot say where a fact came from.")
    return out


def _retrieval_first(q: Questionnaire, reasons: list[str]) -> Guidance:
    """Facts that change or must be cited, before prompting was tried or while the rest of the gap is unclear:
    retrieval now (no prompt brings new facts or their sources), with the prompt's test set and, where the
    form may fail too, prompting or error analysis for that part."""
    reasons = [*_fact_reasons(q), "No prompt wording brings facts that change, or the documents to cite, to the "
               "model: they have to reach it with each question, which is what retrieval does, whatever "
               "prompting was tried.", *reasons]
    steps = _rag_steps()
    if not q.prompting_tried:
        steps.append("Write 50-100 representative questions with the expected answer and the passage it should "
                     "cite; they measure retrieval and the answers.")
    if q.gap in ("behaviour", "both") and not q.prompting_tried:
        reasons.append("The format or style fails too: try prompting for it first (instructions and a few "
                       "examples over the retrieved passages); fine-tune only what prompting cannot fix.")
        steps.append("Run `tuneplan guide --prompting-tried ...` again if the form still fails.")
    elif q.gap == "unsure":
        reasons.append("Whether the form fails too is not yet clear: error analysis tells, once retrieval "
                       "supplies the facts.")
        steps.append("Do error analysis on the answers: mark each failure as missing/wrong facts (retrieval) or "
                     "as wrong format, style or task-following (prompting, then fine-tuning).")
    return Guidance("rag", reasons, steps)


def guide(q: Questionnaire) -> Guidance:
    """The verdict, in this order of rules (each a sentence in FIELD-NOTES.md):
    0. Facts that change often or must be cited -> retrieval, whatever prompting was tried and
       whatever else fails: no prompt wording brings new facts or their sources to the model (the
       form, if it fails too, is then prompted or tuned as below).
    1. Prompting not tried -> prompt first: it is free, and it builds the evaluation set and the
       annotation guide that any later fine-tune needs.
    2. Gap unsure -> prompt first and do error analysis to learn whether facts or form fail.
    3. Retrieval is needed when facts are missing (gap knowledge/both), change often, or must be
       cited; fine-tuning when the form is wrong (gap behaviour/both).
    4. Fine-tuning needs data: fewer than MIN_FINETUNE_EXAMPLES examples -> collect data (RAG or
       prompting meanwhile).
    5. Both needed -> RAG first, then fine-tune.
    """
    reasons: list[str] = []
    steps: list[str] = []
    if q.latency_or_cost_limits and q.gap in ("behaviour", "both"):
        reasons.append("Under latency or cost limits a small fine-tuned model can beat a much larger general "
                       "one, and it removes long few-shot prompts.")

    if (q.knowledge_changes_often or q.must_cite_sources) and (not q.prompting_tried or q.gap == "unsure"):
        return _retrieval_first(q, reasons)

    if not q.prompting_tried:
        reasons.insert(0, "Prompting has not been tried yet: it needs no data and no GPU, and the test inputs "
                       "you write for it become the evaluation set any fine-tune or RAG system needs.")
        if q.gap in ("knowledge", "both") or q.must_cite_sources or q.knowledge_changes_often:
            reasons.append("If the model lacks facts, the likely next step is retrieval (RAG): fine-tuning is "
                           "for form, RAG is for facts.")
        elif q.gap == "behaviour":
            reasons.append("If prompting cannot fix the format or style, fine-tuning is the next step.")
        steps += ["Write 50-100 representative test inputs with the answers you expect.",
                  "Try clear instructions and a few examples in the prompt; score the outputs on the test set.",
                  "Run `tuneplan guide --prompting-tried ...` again with what failed."]
        return Guidance("prompt-first", reasons, steps)

    if q.gap == "unsure":
        reasons.insert(0, "It is not yet clear whether the model lacks facts or behaves wrongly; the fix differs "
                       "(fine-tuning is for form, RAG is for facts).")
        steps += [("Do error analysis on the base model's failures: mark each as missing/wrong facts or as "
                  "wrong format, style or task-following."),
                  "Then run `tuneplan guide --gap knowledge|behaviour|both ...`."]
        return Guidance("prompt-first", reasons, steps)

    needs_rag = q.gap in ("knowledge", "both") or q.knowledge_changes_often or q.must_cite_sources
    needs_ft = q.gap in ("behaviour", "both")
    reasons += _fact_reasons(q)
    if needs_ft:
        reasons.append("The model behaves wrongly (format, style, structure or task-following): that is what "
                       "fine-tuning fixes.")
        if q.many_query_types:
            reasons.append("Fine-tuning can make the model worse at the other kinds of requests it serves; "
                           "evaluate those too, or keep the adapter separate and switch it per request.")

    if needs_ft and q.labelled_examples < MIN_FINETUNE_EXAMPLES:
        reasons.append(f"{q.labelled_examples:,} labelled examples are too few to fine-tune (fewer than "
                       f"{MIN_FINETUNE_EXAMPLES}); collect about 1,000 good input/output pairs first.")
        steps.append("Collect ~1,000 good input/output pairs (quality over quantity, then diversity); use the "
                     "best prompted outputs, corrected by hand, as a start.")
        if needs_rag:
            steps = _rag_steps() + steps
            return Guidance("rag", reasons, steps)
        steps.append("Meanwhile keep improving the prompt; it sets the baseline the fine-tune must beat.")
        return Guidance("prompt-first", reasons, steps)

    if needs_ft:
        method = _finetune_method(q, reasons)
        ft_step = (f"Fine-tune with {'full fine-tuning' if method == 'full' else 'LoRA'}: first a small model "
                   "(0.5-1B) to test the pipeline, then the size the results justify; "
                   f"`tuneplan recommend --model REF --examples {q.labelled_examples}` picks the GPU and batch.")
        if needs_rag:
            reasons.append("Both problems: start with RAG (cheaper, and it fixes the facts), then fine-tune for "
                           "the form; the two combine well.")
            return Guidance("rag+fine-tune", reasons, _rag_steps() + [ft_step])
        return Guidance("fine-tune-full" if method == "full" else "fine-tune-lora", reasons,
                        [ft_step, "Hold out a test set and compare against the prompted baseline."])

    if q.latency_or_cost_limits:
        reasons.append("Retrieval adds a search step and a longer prompt; keep the retrieved context short.")
    return Guidance("rag", reasons, _rag_steps())
