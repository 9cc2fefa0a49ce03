"""MMLU and CMMLU: 5-shot multiple choice per subject, from the releases' per-subject CSV files (MMLU
also from a file of the Hugging Face hub's records, CMMLU from the hub's per-subject folders)."""

from __future__ import annotations

from abc import abstractmethod
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from unite_ext.tasks import cmmlu_subjects, mmlu_subjects
from unite_ext.tasks.base import (
    CATEGORY_METRIC,
    RECORD_SUFFIXES,
    Example,
    Score,
    Task,
    cut_at_stop,
    first_option_letter,
    mean_correct,
    option_lines,
    read_csv_rows,
    read_records,
    require,
)

OPTIONS = ("A", "B", "C", "D")


def subject_accuracies(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy of each subject (records carry ``"subject"`` and ``"correct"``)."""
    by_subject: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_subject[record["subject"]].append(record)
    return {subject: mean_correct(rows) for subject, rows in sorted(by_subject.items())}


Row = tuple[str, list[str], str]  # question, the four option texts, answer letter


def answer_letter(answer: str | int, where: str) -> str:
    """The answer as a letter A-D: a letter (any case) or a 0-based option index (the hub's layout)."""
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(OPTIONS):
        return OPTIONS[answer]
    letter = answer.strip().upper() if isinstance(answer, str) else None
    if letter not in OPTIONS:
        raise ValueError(f"{where}: answer must be one of A-D or an option index 0-3, got {answer!r}")
    return letter


class SubjectChoiceTask(Task):
    """A 5-shot multiple-choice benchmark grouped by subject.

    ``data`` is the folder of the evaluated split (e.g. ``test/``) with one CSV file per subject; the
    solved examples are the first five rows of the same subject in the ``dev/`` folder beside it, or in
    the folder given as ``fewshot``. A task with ``reads_files`` also reads (:meth:`parse_record`) a file
    of records that name their subject (the Hugging Face hub's layout), with ``fewshot`` a file of the same
    layout. Subclasses define the file names, the CSV layout and the prompt wording.
    """

    num_fewshot = 5
    max_new_tokens = 16
    stop = ("\n\n",)
    answer_separator = " "  # between the prompt's answer cue and the letter of a solved example
    reads_files = False  # whether parse_record reads a file of records as --data
    reads_subject_folders = False  # whether parse_subject_record reads a folder of subject folders
    categories: dict[str, tuple[str, ...]] = {}  # category -> its subjects, as the release groups them
    # How the release's script averages a category: over its questions, or over its subjects' accuracies.
    category_mean: Literal["questions", "subjects"] = "questions"

    def subject_of(self, path: Path) -> str:
        """The subject a CSV file holds, from its name."""
        return path.stem

    def rows(self, path: Path) -> list[Row]:
        """(question, four option texts, answer letter) of every row of a CSV file."""
        result = []
        for number, row in enumerate(self.csv_rows(path), start=1):
            question, texts, answer = self.parse_row(row, f"{path} row {number}")
            result.append((question, texts, answer_letter(answer, f"{path} row {number}")))
        return result

    def csv_rows(self, path: Path) -> list[list[str]]:
        return read_csv_rows(path)

    def parse_row(self, row: list[str], where: str) -> tuple[str, list[str], str]:
        if len(row) != 6:
            raise ValueError(f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
        return row[0], row[1:5], row[5]

    def parse_record(self, record: dict[str, Any], where: str) -> tuple[str, Row]:
        """(subject, row) of one record of a file of questions (only where ``reads_files``)."""
        raise NotImplementedError

    def parse_subject_record(self, record: dict[str, Any], where: str) -> Row:
        """The row of one record of a subject's file (only where ``reads_subject_folders``)."""
        raise NotImplementedError

    def subject_folder_rows(self, root: Path, split: str) -> dict[str, list[Row]]:
        """Each subject's rows of one split in a folder of subject folders: ``<subject>/<split>-*`` or
        ``<subject>/<split>/*`` files of records (in name order, so shards keep their order)."""
        found = {}
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            files = sorted(
                path
                for pattern in (f"{split}-*", f"{split}.*", f"{split}/*")
                for path in folder.glob(pattern)
                if path.suffix in RECORD_SUFFIXES
            )
            if files:
                found[folder.name] = [
                    self.parse_subject_record(record, f"{path} record {index}")
                    for path in files
                    for index, record in enumerate(read_records(path))
                ]
        return found

    def subject_files(self, folder: Path) -> dict[str, Path]:
        """Each subject's CSV file in a split folder."""
        return {self.subject_of(path): path for path in sorted(folder.glob("*.csv"))}

    def subject_records(self, path: Path) -> dict[str, list[Row]]:
        """Each subject's rows in a file of records, in file order."""
        by_subject: dict[str, list[Row]] = defaultdict(list)
        for index, record in enumerate(read_records(path)):
            subject, row = self.parse_record(record, f"{path} record {index}")
            by_subject[subject].append(row)
        return by_subject

    def subjects(self, data: Path, fewshot: Path | None) -> tuple[dict[str, list[Row]], dict[str, list[Row]]]:
        """The evaluated rows of each subject, and the rows its solved examples come from."""
        by_folder = (
            self.subject_folder_rows(data, "test") if self.reads_subject_folders and data.is_dir() else {}
        )
        if by_folder:
            if fewshot is not None:
                raise ValueError(
                    f"--data {data} holds one folder per subject: the solved examples come from each "
                    "subject's dev split there; leave out --fewshot"
                )
            questions, fewshot = by_folder, data
            shots = self.subject_folder_rows(data, "dev")
        elif data.is_dir():
            fewshot = Path(fewshot) if fewshot is not None else data.parent / "dev"
            if not fewshot.is_dir():
                raise ValueError(f"few-shot folder not found: {fewshot} (pass --fewshot DIR)")
            files = self.subject_files(data)
            if not files:
                raise ValueError(f"no .csv files in {data}")
            questions = {subject: self.rows(path) for subject, path in files.items()}
            shot_files = self.subject_files(fewshot)
            shots = {subject: self.rows(path) for subject, path in shot_files.items() if subject in files}
        elif self.reads_files and data.is_file():
            if fewshot is None or not Path(fewshot).is_file():
                raise ValueError(
                    f"--data {data} is a file: --fewshot must be the file of solved examples in the same "
                    f"layout (the dev split), got {fewshot}"
                )
            questions = self.subject_records(data)
            shots = self.subject_records(Path(fewshot))
        else:
            kinds = (
                "a split folder (test/)"
                + (" or a file of records" if self.reads_files else "")
                + (" or a folder of subject folders" if self.reads_subject_folders else "")
            )
            raise ValueError(f"--data for {self.name} must be {kinds}: {data}")
        for subject in questions:
            if len(shots.get(subject, ())) < self.num_fewshot:
                raise ValueError(
                    f"{fewshot}: {len(shots.get(subject, ()))} solved examples of subject {subject!r}, "
                    f"need {self.num_fewshot}"
                )
        return questions, shots

    @abstractmethod
    def header(self, subject: str) -> str:
        """The instruction line(s) that open the prompt of a subject."""

    @abstractmethod
    def block(self, question: str, texts: Sequence[str]) -> str:
        """One question with its options, ending where the answer letter goes."""

    def load(self, data: Path, fewshot: Path | None = None) -> list[Example]:
        questions, shots = self.subjects(Path(data), fewshot)
        examples = []
        for subject in sorted(questions):
            solved = "".join(
                f"{self.block(q, t)}{self.answer_separator}{a}\n\n"
                for q, t, a in shots[subject][: self.num_fewshot]
            )
            header = self.header(subject) + solved
            for index, (question, texts, answer) in enumerate(questions[subject]):
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

    def first(self, examples: Sequence[Example], count: int) -> list[Example]:
        """Every subject's first question, then every subject's second, ... until ``count`` (kept in
        their order), so that a limited run covers the subjects evenly rather than the first few."""
        rank: dict[str | None, int] = defaultdict(int)
        turns = []
        for index, example in enumerate(examples):
            turns.append((rank[example.subject], index))
            rank[example.subject] += 1
        return [examples[index] for index in sorted(index for _, index in sorted(turns)[:count])]

    def score(self, response: str, example: Example) -> Score:
        extracted = first_option_letter(cut_at_stop(response, self.stop), example.options)
        return Score(extracted, extracted == example.gold)

    def summarize(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """``accuracy``: the mean over questions; ``subject_accuracy``: the mean over subjects of each
        subject's accuracy (every subject counts once, whatever its size); ``accuracy/<category>``: the
        accuracy of each category with evaluated subjects, averaged as ``category_mean`` says."""
        per_subject = subject_accuracies(records)
        subject_mean = sum(per_subject.values()) / len(per_subject) if per_subject else 0.0
        metrics = {"accuracy": mean_correct(records), "subject_accuracy": subject_mean}
        for category, subjects in self.categories.items():
            evaluated = {subject for subject in subjects if subject in per_subject}
            if not evaluated:
                continue
            metrics[CATEGORY_METRIC + category] = (
                sum(per_subject[subject] for subject in evaluated) / len(evaluated)
                if self.category_mean == "subjects"
                else mean_correct([r for r in records if r["subject"] in evaluated])
            )
        return metrics


class Mmlu(SubjectChoiceTask):
    """MMLU (Hendrycks et al., 2021). Files ``<subject>_<split>.csv`` without a header row; columns
    question, A, B, C, D, answer. Or a file of records in the Hugging Face hub's layout
    (``{"question", "subject", "choices": [4 texts], "answer": 0-3}``, e.g. ``all/test-*.parquet``).
    Prompt wording as in the MMLU release's evaluation script."""

    name = "mmlu"
    reads_files = True
    categories = mmlu_subjects.CATEGORIES

    def parse_record(self, record: dict[str, Any], where: str) -> tuple[str, Row]:
        choices = require(record, "choices", where)
        if not isinstance(choices, list) or len(choices) != len(OPTIONS):
            raise ValueError(f"{where}: 'choices' must be a list of 4 option texts, got {choices!r}")
        answer = answer_letter(require(record, "answer", where), where)
        return str(require(record, "subject", where)), (require(record, "question", where), choices, answer)

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
    (the first column is a row number), or the Hugging Face hub's folders of the same columns, one per
    subject (``<subject>/test-*.parquet`` and ``<subject>/dev-*.parquet``, or ``<subject>/test/*.parquet``
    as the hub converts a dataset to Parquet). Chinese prompt wording and subject names as in the CMMLU
    release."""

    name = "cmmlu"
    answer_separator = ""
    columns = ("Question", "A", "B", "C", "D", "Answer")
    reads_subject_folders = True
    categories = cmmlu_subjects.CATEGORIES
    category_mean = "subjects"

    def parse_subject_record(self, record: dict[str, Any], where: str) -> Row:
        question, *texts, answer = (require(record, column, where) for column in self.columns)
        return question, texts, answer_letter(answer, where)

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
        # The release's Chinese subject name; a subject outside the release is named by its folder.
        name = cmmlu_subjects.SUBJECT_NAMES.get(subject, subject.replace("_", " "))
        return f"以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n"

    def block(self, question: str, texts: Sequence[str]) -> str:
        return f"题目：{question.strip()}\n{option_lines(OPTIONS, [t.strip() for t in texts])}\n答案是："
