"""What every benchmark task shares: the example type, the task interface and file readers."""

from __future__ import annotations

import csv
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Gold = str | list[str]


@dataclass(frozen=True)
class Example:
    """One benchmark question, ready to be sent to a model.

    Attributes:
        id: stable identifier (the dataset's own id, or the position in the file); ``unite eval``
            resumes by it.
        prompt: the full text given to the model (few-shot examples included).
        gold: the reference: a number string (GSM8K), an option letter (multiple choice) or the list of
            accepted answers (open QA).
        options: the option letters the model may answer with (multiple choice only).
        subject: the subject of MMLU/CMMLU questions, else ``None``.
    """

    id: str
    prompt: str
    gold: Gold
    options: tuple[str, ...] = ()
    subject: str | None = None


@dataclass(frozen=True)
class Score:
    """The answer read from a model's response and whether it is right."""

    extracted: str | None
    correct: bool


class Task(ABC):
    """A benchmark: how to read its files, build prompts and score responses.

    Class attributes:
        name: the name used on the command line.
        num_fewshot: how many solved examples precede each question.
        max_new_tokens: default generation budget per question.
        stop: strings that end a response; the response is cut at the first one.
    """

    name: str
    num_fewshot: int
    max_new_tokens: int
    stop: tuple[str, ...]

    @abstractmethod
    def load(self, data: Path, fewshot: Path | None = None) -> list[Example]:
        """Read the questions in ``data`` and build their prompts.

        Args:
            data: the file (or folder, for MMLU/CMMLU) of questions to evaluate.
            fewshot: where the solved examples come from; ``None`` uses the task's default (see
                ``docs/tasks.md``).
        """

    @abstractmethod
    def score(self, response: str, example: Example) -> Score:
        """Read the answer from a model's response and compare it with the gold answer."""

    def first(self, examples: Sequence[Example], count: int) -> list[Example]:
        """The ``count`` questions a limited run evaluates (``--limit``): the first ones."""
        return list(examples[:count])

    def summarize(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Accuracy over the evaluated records (each with a boolean ``"correct"``).

        Returns ``{"accuracy": fraction correct}``; tasks with subjects add more entries.
        """
        return {"accuracy": mean_correct(records)}


# Metrics named with this prefix are category accuracies ("accuracy/STEM"), from tasks with categories.
CATEGORY_METRIC = "accuracy/"


def mean_correct(records: Sequence[dict[str, Any]]) -> float:
    """Fraction of ``records`` whose ``"correct"`` is true; 0.0 for no records."""
    if not records:
        return 0.0
    return sum(bool(r["correct"]) for r in records) / len(records)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    end = len(text)
    for s in stop:
        position = text.find(s)
        if position != -1:
            end = min(end, position)
    return text[:end]


RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")


def read_records(path: Path) -> list[dict[str, Any]]:
    """Read a dataset file: JSON Lines (``.jsonl``), JSON (``.json``) or Parquet (``.parquet``).

    A ``.json`` file may hold a list of records, or an object whose ``"data"`` or ``"Data"`` member is
    that list (the layout of the TriviaQA release). A ``.parquet`` file (the Hugging Face hub's layout)
    gives one record per row, nested columns as dicts and lists; reading it needs ``pyarrow``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet
        except ImportError as error:
            raise ImportError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from error
        return pyarrow.parquet.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON: {error}") from error
        return records
    if path.suffix == ".json":
        content = json.loads(text)
        if isinstance(content, dict):
            for key in ("data", "Data"):
                if isinstance(content.get(key), list):
                    return content[key]
            raise ValueError(f"{path}: a JSON object must hold the records in 'data' or 'Data'")
        if not isinstance(content, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        return content
    kinds = f"{', '.join(RECORD_SUFFIXES[:-1])} or {RECORD_SUFFIXES[-1]}"
    raise ValueError(f"{path}: unsupported data file type {path.suffix!r}; use {kinds}")


def require(record: dict[str, Any], key: str, where: str) -> Any:
    """``record[key]``, with an error that names the file position and the missing field."""
    if key not in record:
        raise ValueError(f"{where}: missing field {key!r} (fields: {sorted(record)})")
    return record[key]


def read_csv_rows(path: Path) -> list[list[str]]:
    """All rows of a UTF-8 CSV file (a byte-order mark is ignored)."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        return [row for row in csv.reader(handle) if row]


_OPTION_LETTER_BOUNDARY = "(?<![A-Za-z])({})(?![A-Za-z])"


def first_option_letter(response: str, options: Sequence[str]) -> str | None:
    """The first of ``options`` that stands alone in ``response`` (no Latin letter on either side).

    ``"B"``, ``" (B) because"``, ``"答案是B。"`` and ``"The answer is B"`` all give ``B`` for options
    A-D; the ``A`` inside ``"Answer"`` does not count. ``None`` when no option letter occurs.
    """
    pattern = _OPTION_LETTER_BOUNDARY.format("|".join(re.escape(o) for o in options))
    match = re.search(pattern, response)
    return match.group(1) if match else None


def option_lines(options: Sequence[str], texts: Sequence[str]) -> str:
    """``"A. first\\nB. second"``: one line per option."""
    return "\n".join(f"{letter}. {text}" for letter, text in zip(options, texts, strict=True))


LETTERS = "ABCDEFGHIJ"
