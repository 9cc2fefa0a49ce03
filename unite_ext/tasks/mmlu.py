"""MMLU and CMMLU: 5-shot multiple choice per subject, from the release's per-subject CSV files."""

from __future__ import annotations

from abc import abstractmethod
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unite_ext.tasks.base import (
    Example,
    Score,
    Task,
    cut_at_stop,
    first_option_letter,
    mean_correct,
    option_lines,
    read_csv_rows,
)

OPTIONS = ("A", "B", "C", "D")


def subject_accuracies(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy of each subject (records carry ``"subject"`` and ``"correct"``)."""
    by_subject: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_subject[record["subject"]].append(record)
    return {subject: mean_correct(rows) for subject, rows in sorted(by_subject.items())}


class SubjectChoiceTask(Task):
    """A 5-shot multiple-choice benchmark with one CSV file per subject and split.

    ``data`` is the folder of the evaluated split (e.g. ``test/``); the solved examples are the first
    five rows of the same subject in the ``dev/`` folder beside it, or in the folder given as
    ``fewshot``. Subclasses define the file names, the CSV layout and the prompt wording.
    """

    num_fewshot = 5
    max_new_tokens = 16
    stop = ("\n\n",)
    answer_separator = " "  # between the prompt's answer cue and the letter of a solved example

    def subject_of(self, path: Path) -> str:
        """The subject a CSV file holds, from its name."""
        return path.stem

    def rows(self, path: Path) -> list[tuple[str, list[str], str]]:
        """(question, four option texts, answer letter) of every row of a CSV file."""
        result = []
        for number, row in enumerate(self.csv_rows(path), start=1):
            question, texts, answer = self.parse_row(row, f"{path} row {number}")
            answer = answer.strip().upper()
            if answer not in OPTIONS:
                raise ValueError(f"{path} row {number}: answer must be one of A-D, got {answer!r}")
            result.append((question, texts, answer))
        return result

    def csv_rows(self, path: Path) -> list[list[str]]:
        return read_csv_rows(path)

    def parse_row(self, row: list[str], where: str) -> tuple[str, list[str], str]:
        if len(row) != 6:
            raise ValueError(f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
        return row[0], row[1:5], row[5]

    @abstractmethod
    def header(self, subject: str) -> str:
        """The instruction line(s) that open the prompt of a subject."""

    @abstractmethod
    def block(self, question: str, texts: Sequence[str]) -> str:
        """One question with its options, ending where the answer letter goes."""

    def load(self, data: Path, fewshot: Path | None = None) -> list[Example]:
        data = Path(data)
        if not data.is_dir():
            raise ValueError(f"--data for {self.name} must be the folder of one split (e.g. test/): {data}")
        fewshot_dir = Path(fewshot) if fewshot is not None else data.parent / "dev"
        if not fewshot_dir.is_dir():
            raise ValueError(f"few-shot folder not found: {fewshot_dir} (pass --fewshot DIR)")
        fewshot_files = {self.subject_of(p): p for p in sorted(fewshot_dir.glob("*.csv"))}
        files = sorted(data.glob("*.csv"))
        if not files:
            raise ValueError(f"no .csv files in {data}")
        examples = []
        for path in files:
            subject = self.subject_of(path)
            if subject not in fewshot_files:
                raise ValueError(f"no few-shot file for subject {subject!r} in {fewshot_dir}")
            shots = self.rows(fewshot_files[subject])[: self.num_fewshot]
            if len(shots) < self.num_fewshot:
                raise ValueError(f"{fewshot_files[subject]}: {len(shots)} rows, need {self.num_fewshot}")
            solved = "".join(f"{self.block(q, t)}{self.answer_separator}{a}\n\n" for q, t, a in shots)
            header = self.header(subject) + solved
            for index, (question, texts, answer) in enumerate(self.rows(path)):
                examples.append(
                    Example(
                        id=f"{subject}/{index}",
                        prompt=header + self.block(question, texts),
                        gold=answer,
                        options=OPTIONS,
                        subject=subject,
                    )
                )
        return examples

    def score(self, response: str, example: Example) -> Score:
        extracted = first_option_letter(cut_at_stop(response, self.stop), example.options)
        return Score(extracted, extracted == example.gold)

    def summarize(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """``accuracy``: the mean over questions; ``subject_accuracy``: the mean over subjects of each
        subject's accuracy (every subject counts once, whatever its size)."""
        per_subject = subject_accuracies(records)
        subject_mean = sum(per_subject.values()) / len(per_subject) if per_subject else 0.0
        return {"accuracy": mean_correct(records), "subject_accuracy": subject_mean}


class Mmlu(SubjectChoiceTask):
    """MMLU (Hendrycks et al., 2021). Files ``<subject>_<split>.csv`` without a header row; columns
    question, A, B, C, D, answer. Prompt wording as in the MMLU release's evaluation script."""

    name = "mmlu"

    def subject_of(self, path: Path) -> str:
        stem = path.stem
        for split in ("_dev", "_val", "_test"):
            if stem.endswith(split):
                return stem[: -len(split)]
        return stem

    def header(self, subject: str) -> str:
        topic = subject.replace("_", " ")
        return f"The following are multiple choice questions (with answers) about {topic}.\n\n"

    def block(self, question: str, texts: Sequence[str]) -> str:
        return f"{question.strip()}\n{option_lines(OPTIONS, [t.strip() for t in texts])}\nAnswer:"


class Cmmlu(SubjectChoiceTask):
    """CMMLU (Li et al., 2023). Files ``<subject>.csv`` with the header row ``,Question,A,B,C,D,Answer``
    (the first column is a row number). Chinese prompt wording as in the CMMLU release."""

    name = "cmmlu"
    answer_separator = ""
    columns = ("Question", "A", "B", "C", "D", "Answer")

    def csv_rows(self, path: Path) -> list[list[str]]:
        rows = read_csv_rows(path)
        if not rows or [c.strip() for c in rows[0][-6:]] != list(self.columns):
            raise ValueError(f"{path}: expected the header row ',Question,A,B,C,D,Answer'")
        width = len(rows[0])
        for number, row in enumerate(rows[1:], start=2):
            if len(row) != width:
                raise ValueError(f"{path} row {number}: {len(row)} columns, the header has {width}")
        return [row[-6:] for row in rows[1:]]

    def header(self, subject: str) -> str:
        return f"以下是关于{subject.replace('_', ' ')}的单项选择题，请直接给出正确答案的选项。\n\n"

    def block(self, question: str, texts: Sequence[str]) -> str:
        return f"题目：{question.strip()}\n{option_lines(OPTIONS, [t.strip() for t in texts])}\n答案是："
