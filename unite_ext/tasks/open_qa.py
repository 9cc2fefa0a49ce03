"""Open-domain question answering with short answers, 5-shot: TriviaQA and Natural Questions."""

from __future__ import annotations

import re
import unicodedata
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unite_ext.tasks.base import Example, Score, Task, cut_at_stop, read_records, require

INSTRUCTION = "Answer these questions with a short answer."
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation deleted, the articles a/an/the removed, whitespace collapsed (the
    normalisation of the SQuAD and TriviaQA evaluation scripts; ``"U.S.A."`` becomes ``"usa"``)."""
    text = "".join(c for c in text.lower() if not unicodedata.category(c).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_matches(prediction: str, aliases: Sequence[str]) -> bool:
    """Whether a prediction is right: its normalised form equals a normalised gold alias, or contains one
    as whole words. An empty prediction (after normalisation) is always wrong, and an alias that
    normalises to nothing matches nothing."""
    predicted = normalize_answer(prediction)
    if not predicted:
        return False
    for alias in aliases:
        gold = normalize_answer(alias)
        if gold and (predicted == gold or f" {gold} " in f" {predicted} "):
            return True
    return False


def question_block(question: str) -> str:
    """The part of the prompt that poses one question."""
    return f"Question: {question.strip()}\nAnswer:"


class OpenQaTask(Task):
    """A 5-shot short-answer task. The prediction is the first line of the response, stripped; it is
    scored by :func:`answer_matches`."""

    num_fewshot = 5
    max_new_tokens = 32
    stop = ("\n",)

    @abstractmethod
    def parse(self, record: dict[str, Any], where: str) -> tuple[str, list[str]]:
        """(question, accepted answers) of one record; the first answer is the one shown in exemplars."""

    def load(self, data: Path, fewshot: Path | None = None) -> list[Example]:
        if fewshot is None:
            raise ValueError(f"task {self.name} needs --fewshot FILE (solved examples, e.g. the train split)")
        if Path(fewshot).resolve() == Path(data).resolve():
            raise ValueError(f"--fewshot {fewshot} is the evaluated file itself; use another split")
        shots = read_records(fewshot)[: self.num_fewshot]
        if len(shots) < self.num_fewshot:
            raise ValueError(f"--fewshot {fewshot}: need {self.num_fewshot} examples, found {len(shots)}")
        header = INSTRUCTION + "\n\n"
        for index, record in enumerate(shots):
            question, answers = self.parse(record, f"{fewshot} record {index}")
            header += f"{question_block(question)} {answers[0].strip()}\n\n"
        examples = []
        for index, record in enumerate(read_records(data)):
            question, answers = self.parse(record, f"{data} record {index}")
            examples.append(
                Example(
                    id=self.record_id(record, index), prompt=header + question_block(question), gold=answers
                )
            )
        return examples

    @staticmethod
    def record_id(record: dict[str, Any], index: int) -> str:
        for key in ("id", "question_id", "QuestionId"):
            if key in record:
                return str(record[key])
        return str(index)

    def score(self, response: str, example: Example) -> Score:
        prediction = cut_at_stop(response, self.stop).strip()
        return Score(prediction, answer_matches(prediction, example.gold))


class TriviaQa(OpenQaTask):
    """TriviaQA (Joshi et al., 2017): accepted answers are the answer value and its aliases."""

    name = "triviaqa"

    def parse(self, record: dict[str, Any], where: str) -> tuple[str, list[str]]:
        # The original release capitalises the keys ("Question", "Answer": {"Value", "Aliases"}); the
        # Hugging Face layout does not ("question", "answer": {"value", "aliases"}).
        capitalised = "Question" in record
        keys = (
            ("Question", "Answer", "Value", "Aliases")
            if capitalised
            else ("question", "answer", "value", "aliases")
        )
        question = require(record, keys[0], where)
        answer = require(record, keys[1], where)
        answers = [require(answer, keys[2], where), *answer.get(keys[3], [])]
        return question, list(dict.fromkeys(answers))


class NaturalQuestions(OpenQaTask):
    """Natural Questions, open-domain version (NQ-Open, Lee et al., 2019).

    Records: ``{"question": str, "answer": [str, ...]}``.
    """

    name = "nq"

    def parse(self, record: dict[str, Any], where: str) -> tuple[str, list[str]]:
        answers = require(record, "answer", where)
        if isinstance(answers, str):
            answers = [answers]
        if not answers:
            raise ValueError(f"{where}: empty answer list")
        return require(record, "question", where), list(answers)
