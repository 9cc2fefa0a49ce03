"""Zero-shot multiple choice answered with a letter: ARC-Challenge and PIQA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unite_ext.tasks.base import (
    LETTERS,
    Example,
    Score,
    Task,
    cut_at_stop,
    first_option_letter,
    option_lines,
    read_records,
    require,
)

INSTRUCTION = "Answer with the letter of the correct option."


class LetterChoiceTask(Task):
    """A zero-shot task whose response is scored by the first option letter in it."""

    num_fewshot = 0
    max_new_tokens = 16
    stop = ("\n\n", "Question:")

    def score(self, response: str, example: Example) -> Score:
        extracted = first_option_letter(cut_at_stop(response, self.stop), example.options)
        return Score(extracted, extracted == example.gold)

    @staticmethod
    def refuse_fewshot(name: str, fewshot: Path | None) -> None:
        if fewshot is not None:
            raise ValueError(f"task {name} is zero-shot; do not pass --fewshot")


def arc_prompt(question: str, texts: list[str]) -> str:
    """The zero-shot ARC prompt of one question."""
    options = LETTERS[: len(texts)]
    return f"Question: {question.strip()}\n{option_lines(options, texts)}\n{INSTRUCTION}\nAnswer:"


def arc_choices(record: dict[str, Any], where: str) -> tuple[str, list[str], list[str]]:
    """(question, option texts, dataset labels) of an ARC record in either published layout."""
    question = require(record, "question", where)
    if isinstance(question, dict):  # the AI2 release: {"stem": ..., "choices": [{"text", "label"}, ...]}
        choices = require(question, "choices", where)
        return require(question, "stem", where), [c["text"] for c in choices], [c["label"] for c in choices]
    choices = require(record, "choices", where)  # the Hugging Face layout: {"text": [...], "label": [...]}
    return question, list(choices["text"]), list(choices["label"])


class ArcChallenge(LetterChoiceTask):
    """ARC-Challenge (Clark et al., 2018), zero-shot. Options are relabelled A, B, C, ... in the order
    given (some questions use the labels 1-4); the gold letter follows the relabelling."""

    name = "arc_challenge"

    def load(self, data: Path, fewshot: Path | None = None) -> list[Example]:
        self.refuse_fewshot(self.name, fewshot)
        examples = []
        for index, record in enumerate(read_records(data)):
            where = f"{data} record {index}"
            question, texts, labels = arc_choices(record, where)
            answer_key = str(require(record, "answerKey", where)).strip()
            if answer_key not in labels:
                raise ValueError(f"{where}: answerKey {answer_key!r} is not one of the labels {labels}")
            options = tuple(LETTERS[: len(texts)])
            examples.append(
                Example(
                    id=str(record.get("id", index)),
                    prompt=arc_prompt(question, texts),
                    gold=options[labels.index(answer_key)],
                    options=options,
                )
            )
        return examples


def piqa_prompt(goal: str, solution1: str, solution2: str) -> str:
    """The zero-shot PIQA prompt of one goal."""
    options = option_lines("AB", [solution1.strip(), solution2.strip()])
    return f"Goal: {goal.strip()}\n{options}\nWhich solution achieves the goal? {INSTRUCTION}\nAnswer:"


def piqa_labels(data: Path, records: list[dict[str, Any]]) -> list[int]:
    """The gold labels (0 or 1): each record's ``"label"``, or the release's ``<name>-labels.lst``."""
    if all("label" in r for r in records):
        return [int(r["label"]) for r in records]
    labels_file = data.with_name(f"{data.stem}-labels.lst")
    if not labels_file.is_file():
        raise ValueError(f"{data}: records have no 'label' field and {labels_file} does not exist")
    labels = [int(line) for line in labels_file.read_text().split()]
    if len(labels) != len(records):
        raise ValueError(f"{labels_file} has {len(labels)} labels for {len(records)} records in {data}")
    return labels


class Piqa(LetterChoiceTask):
    """PIQA (Bisk et al., 2020), zero-shot: option A is ``sol1``, B is ``sol2``."""

    name = "piqa"

    def load(self, data: Path, fewshot: Path | None = None) -> list[Example]:
        self.refuse_fewshot(self.name, fewshot)
        data = Path(data)
        records = read_records(data)
        examples = []
        for index, (record, label) in enumerate(zip(records, piqa_labels(data, records), strict=True)):
            where = f"{data} record {index}"
            if label not in (0, 1):
                raise ValueError(f"{where}: label must be 0 or 1, got {label}")
            prompt = piqa_prompt(
                require(record, "goal", where), require(record, "sol1", where), require(record, "sol2", where)
            )
            examples.append(
                Example(id=str(record.get("id", index)), prompt=prompt, gold="AB"[label], options=("A", "B"))
            )
        return examples
