"""Prompt, RAG or fine-tune: the verdicts for representative situations (FIELD-NOTES.md)."""

from __future__ import annotations

import argparse
import json

import pytest
from pydantic import ValidationError

from advisor.guide import FULL_FINETUNE_EXAMPLES, MIN_FINETUNE_EXAMPLES, Questionnaire, guide
from advisor.problems import UserError


def verdict(**kw) -> str:
    return guide(Questionnaire(**{"prompting_tried": True, **kw})).verdict


def test_prompting_not_tried_means_prompt_first_whatever_the_gap():
    for gap in ("knowledge", "behaviour", "both", "unsure"):
        g = guide(Questionnaire(gap=gap, labelled_examples=50_000))
        assert g.verdict == "prompt-first"
        assert any("evaluation set" in r for r in g.reasons)
    # the likely next step is named
    assert any("RAG" in r for r in guide(Questionnaire(gap="knowledge")).reasons)
    assert any("fine-tuning" in r for r in guide(Questionnaire(gap="behaviour")).reasons)


def test_unsure_gap_asks_for_error_analysis():
    g = guide(Questionnaire(gap="unsure", prompting_tried=True, labelled_examples=5000))
    assert g.verdict == "prompt-first" and any("error analysis" in s for s in g.next_steps)


@pytest.mark.parametrize("kw", [
    {"gap": "knowledge"},
    {"gap": "knowledge", "knowledge_changes_often": True},
    {"gap": "knowledge", "must_cite_sources": True, "labelled_examples": 50_000},
    {"gap": "knowledge", "latency_or_cost_limits": True},
])
def test_missing_facts_mean_rag(kw):
    assert verdict(**kw) == "rag"


def test_rag_starts_with_bm25_before_a_vector_database():
    g = guide(Questionnaire(gap="knowledge", prompting_tried=True))
    assert "BM25" in g.next_steps[0] and "vector database" in g.next_steps[0]
    assert any("form, not facts" in r for r in g.reasons)


def test_citations_and_changing_knowledge_are_reasons_in_words():
    g = guide(Questionnaire(gap="knowledge", prompting_tried=True, must_cite_sources=True,
                            knowledge_changes_often=True))
    text = " ".join(g.reasons)
    assert "cite" in text and "changes often" in text


@pytest.mark.parametrize("n, expected", [
    (MIN_FINETUNE_EXAMPLES, "fine-tune-lora"),
    (500, "fine-tune-lora"),
    (FULL_FINETUNE_EXAMPLES - 1, "fine-tune-lora"),
    (FULL_FINETUNE_EXAMPLES, "fine-tune-full"),
    (200_000, "fine-tune-full"),
])
def test_behaviour_gap_means_fine_tuning_lora_then_full_with_more_data(n, expected):
    assert verdict(gap="behaviour", labelled_examples=n) == expected


def test_too_few_examples_means_collect_data_first():
    g = guide(Questionnaire(gap="behaviour", prompting_tried=True, labelled_examples=MIN_FINETUNE_EXAMPLES - 1))
    assert g.verdict == "prompt-first"
    assert any("1,000" in s for s in g.next_steps)
    assert verdict(gap="both", labelled_examples=20) == "rag"  # RAG now, fine-tune once data exists


def test_many_query_types_keep_it_to_lora():
    g = guide(Questionnaire(gap="behaviour", prompting_tried=True, labelled_examples=50_000, many_query_types=True))
    assert g.verdict == "fine-tune-lora"
    assert any("hurt" in r for r in g.reasons)


def test_both_gaps_start_with_rag_then_fine_tune():
    g = guide(Questionnaire(gap="both", prompting_tried=True, labelled_examples=2000))
    assert g.verdict == "rag+fine-tune"
    assert "BM25" in g.next_steps[0] and "Fine-tune" in g.next_steps[-1]
    assert verdict(gap="behaviour", must_cite_sources=True, labelled_examples=2000) == "rag+fine-tune"


def test_latency_limits_favour_a_small_tuned_model_in_words():
    g = guide(Questionnaire(gap="behaviour", prompting_tried=True, labelled_examples=1000,
                            latency_or_cost_limits=True))
    assert g.verdict == "fine-tune-lora" and any("small fine-tuned model" in r for r in g.reasons)


def test_reasons_are_plain_sentences():
    for gap in ("knowledge", "behaviour", "both", "unsure"):
        for tried in (False, True):
            g = guide(Questionnaire(gap=gap, prompting_tried=tried, labelled_examples=1000))
            assert g.reasons and g.next_steps
            assert all(r[0].isupper() or r[0].isdigit() for r in g.reasons)
            assert all(r.endswith(".") for r in g.reasons)


def test_questionnaire_rejects_bad_input():
    with pytest.raises(ValidationError):
        Questionnaire(labelled_examples=-1)
    with pytest.raises(ValidationError):
        Questionnaire(gap="vibes")
    with pytest.raises(ValidationError):
        Questionnaire(unknown=True)


def run(argv):
    from advisor.cli.advice import add_commands

    p = argparse.ArgumentParser(prog="tuneplan")
    add_commands(p.add_subparsers(dest="command"))
    a = p.parse_args(argv)
    return a.func(a)


def test_cli_guide_json(capsys):
    assert run(["guide", "--gap", "both", "--examples", "500", "--prompting-tried", "--cite", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "rag+fine-tune" and out["questionnaire"]["must_cite_sources"] is True


def test_cli_guide_text(capsys):
    assert run(["guide", "--gap", "behaviour", "--examples", "20000", "--prompting-tried"]) == 0
    assert "fine-tune-full" in capsys.readouterr().out


def test_cli_guide_negative_examples_is_a_user_error():
    with pytest.raises(UserError) as e:
        run(["guide", "--examples", "-3"])
    from advisor.cli.common import render

    assert e.value.items[0].field == "guide.labelled_examples" and "--examples" in render(e.value.items[0])


@pytest.mark.parametrize("gap", ["knowledge", "behaviour", "both", "unsure"])
@pytest.mark.parametrize("tried", [False, True])
@pytest.mark.parametrize("facts", [{"knowledge_changes_often": True}, {"must_cite_sources": True},
                                   {"knowledge_changes_often": True, "must_cite_sources": True}])
@pytest.mark.parametrize("examples", [0, 500])
def test_facts_that_change_or_must_be_cited_go_to_retrieval_whatever_prompting_was_tried(gap, tried, facts, examples):
    """`guide --gap knowledge --changes-often --cite` said prompt-first: no prompt brings new facts or their
    sources, so every such question gets retrieval (with a fine-tune beside it only where the form fails, the
    prompt was tried and the data is there)."""
    g = guide(Questionnaire(gap=gap, prompting_tried=tried, labelled_examples=examples, **facts))
    form_tuned = gap in ("behaviour", "both") and tried and examples >= MIN_FINETUNE_EXAMPLES
    assert g.verdict == ("rag+fine-tune" if form_tuned else "rag")
    assert "BM25" in g.next_steps[0]
    assert all((r[0].isupper() or r[0].isdigit()) and r.endswith(".") for r in g.reasons)
    if not tried:
        assert any("whatever prompting was tried" in r for r in g.reasons)
        assert any("passage it should cite" in s for s in g.next_steps)  # the test set prompting would have built
    if gap in ("behaviour", "both") and not tried:
        assert any("try prompting for it first" in r for r in g.reasons)
    if gap == "unsure":
        assert any("error analysis" in s.lower() for s in g.next_steps)


def test_cli_guide_changing_cited_knowledge_is_rag(capsys):
    assert run(["guide", "--gap", "knowledge", "--changes-often", "--cite", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "rag"
