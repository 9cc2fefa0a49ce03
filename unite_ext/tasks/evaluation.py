"""Running a task: generate a response for every example, score it, write one JSON line per example.

The generation side is a plain function (:class:`GenerateFn`), so the same loop evaluates an ensemble,
a single model (a one-model ensemble) or a stub in tests.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from unite_ext.tasks.base import CATEGORY_METRIC, Example, Task


class GenerationLike(Protocol):
    """What the loop reads from a generation: the response text and the number of decoding steps."""

    text: str
    num_steps: int


class GenerateFn(Protocol):
    """Generates one response per prompt (greedy unless the function was built otherwise)."""

    def __call__(
        self, prompts: list[str], *, max_new_tokens: int, stop: list[str]
    ) -> Sequence[GenerationLike]: ...


def ensemble_generator(ensemble: Any, *, chat: bool = False, **options: Any) -> GenerateFn:
    """The generation function of a :class:`unite_ext.decode.Ensemble`.

    Args:
        ensemble: the ensemble (one model for a single-model baseline).
        chat: send each prompt as one user message in every model's chat template (default false:
            the prompt text as it is).
        options: further ``Ensemble.generate`` arguments: sampling (``do_sample``, ``temperature``,
            ``top_p``, ``seed``; default greedy) and ``chat_template_kwargs``.
    """

    def generate(prompts: list[str], *, max_new_tokens: int, stop: list[str]) -> Sequence[GenerationLike]:
        inputs: dict[str, Any] = (
            {"messages": [[{"role": "user", "content": p}] for p in prompts]}
            if chat
            else {"prompts": prompts}
        )
        return ensemble.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            stop=stop,
            batch_size=len(prompts),
            progress=False,
            **options,
        )

    return generate


def lazy_generator(build: Callable[[], GenerateFn]) -> GenerateFn:
    """A generation function that calls ``build`` (e.g. loads the models) on its first use only, so
    that resuming a finished run loads nothing."""

    @functools.cache
    def built() -> GenerateFn:
        return build()

    def generate(prompts: list[str], *, max_new_tokens: int, stop: list[str]) -> Sequence[GenerationLike]:
        return built()(prompts, max_new_tokens=max_new_tokens, stop=stop)

    return generate


@dataclass(frozen=True)
class EvalResult:
    """The outcome of evaluating one task.

    Attributes:
        task: the task name.
        records: one dict per evaluated example, in example order (those read back from the output
            file included).
        metrics: the task's summary (``accuracy``; MMLU/CMMLU add ``subject_accuracy`` and
            ``accuracy/<category>``).
        tokens: decoding steps over all records.
        seconds: generation time over all records.
    """

    task: str
    records: list[dict[str, Any]]
    metrics: dict[str, float]
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def read_output(out: Path) -> list[dict[str, Any]]:
    """The records of a partly written output file.

    A last line cut short (the run was killed while writing it) is removed from the file; any other
    line that is not valid JSON is an error.
    """
    if not out.exists():
        return []
    raw = out.read_bytes()
    lines = raw.split(b"\n")
    records = []
    offset = 0  # bytes of the file that hold complete lines
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                if number < len(lines):
                    raise ValueError(f"{out}:{number}: not valid JSON ({error})") from error
                with open(out, "r+b") as handle:  # the unterminated last line: drop it
                    handle.truncate(offset)
                return records
        offset += len(line) + 1
    if not raw.endswith(b"\n") and raw:  # a complete last record whose newline was not written
        with open(out, "ab") as handle:
            handle.write(b"\n")
    return records


def check_resumed(
    records: list[dict[str, Any]], examples: Sequence[Example], run: dict[str, Any], out: Path
) -> None:
    """Refuse to resume from records of a different run (other models, settings or prompts)."""
    prompts = {e.id: e.prompt for e in examples}
    for record in records:
        if record.get("run") != run:
            raise ValueError(
                f"{out} was written by a different run ({record.get('run')}) than this one ({run}); "
                "use another --out or delete the file"
            )
        if record["id"] in prompts and record["prompt"] != prompts[record["id"]]:
            raise ValueError(
                f"{out}: example {record['id']!r} was evaluated with a different prompt (other data or "
                "few-shot file); use another --out or delete the file"
            )


def evaluate(
    task: Task,
    examples: Sequence[Example],
    generate: GenerateFn,
    out: Path | None = None,
    *,
    run: dict[str, Any] | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate ``examples`` of ``task`` with ``generate``.

    Args:
        task: scores responses and summarises the records.
        examples: what to evaluate, e.g. ``task.load(data)`` or ``task.first(task.load(data), limit)``.
        generate: produces the responses.
        out: JSON Lines file, one record per example: ``id``, ``prompt``, ``prediction`` (the response),
            ``extracted`` (the answer read from it), ``gold``, ``correct``, ``tokens`` (decoding steps),
            ``seconds`` (the example's share of its batch's wall time), ``subject`` (MMLU/CMMLU) and
            ``run``. If the file exists, the examples already in it are not generated again; it must
            come from the same ``run`` and prompts. ``None`` keeps records in memory only.
        run: what identifies the run (models, weights, settings); stored in every record and compared
            on resume. Default ``{"task": task.name}``.
        batch_size: prompts per ``generate`` call (default 8).
        max_new_tokens: generation budget per example (default: the task's ``max_new_tokens``).
        progress: show a progress bar on stderr (default true).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    run = run if run is not None else {"task": task.name}
    budget = max_new_tokens if max_new_tokens is not None else task.max_new_tokens
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"task {task.name}: example ids are not unique")
    done: dict[str, dict[str, Any]] = {}
    if out is not None:
        previous = read_output(out)
        check_resumed(previous, examples, run, out)
        done = {r["id"]: r for r in previous}
        foreign = len(set(done) - set(ids))
        if foreign:
            note = f"note: {out} holds {foreign} examples outside this selection; the summary leaves them out"
            print(note, file=sys.stderr)
    pending = [e for e in examples if e.id not in done]
    handle = open(out, "a", encoding="utf-8") if out is not None else None
    try:
        initial = len(examples) - len(pending)
        bar = tqdm(total=len(examples), initial=initial, desc=task.name, disable=not progress, unit="example")
        with bar:
            for start in range(0, len(pending), batch_size):
                batch = pending[start : start + batch_size]
                began = time.perf_counter()
                generations = generate([e.prompt for e in batch], max_new_tokens=budget, stop=list(task.stop))
                share = (time.perf_counter() - began) / len(batch)
                if len(generations) != len(batch):
                    raise RuntimeError(f"generate gave {len(generations)} results for {len(batch)} prompts")
                for example, generation in zip(batch, generations, strict=True):
                    record = make_record(task, example, generation, share, run)
                    done[example.id] = record
                    if handle is not None:
                        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                if handle is not None:
                    handle.flush()
                    os.fsync(handle.fileno())
                bar.update(len(batch))
    finally:
        if handle is not None:
            handle.close()
    records = [done[i] for i in ids]
    return EvalResult(
        task=task.name,
        records=records,
        metrics=task.summarize(records),
        tokens=sum(r["tokens"] for r in records),
        seconds=sum(r["seconds"] for r in records),
    )


def make_record(
    task: Task, example: Example, generation: GenerationLike, seconds: float, run: dict[str, Any]
) -> dict[str, Any]:
    """The output line of one example."""
    score = task.score(generation.text, example)
    record: dict[str, Any] = {
        "id": example.id,
        "prompt": example.prompt,
        "prediction": generation.text,
        "extracted": score.extracted,
        "gold": example.gold,
        "correct": score.correct,
        "tokens": int(generation.num_steps),
        "seconds": seconds,
    }
    if example.subject is not None:
        record["subject"] = example.subject
    record["run"] = run
    return record


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with columns padded to their widest cell."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def format_summary(results: Sequence[EvalResult]) -> str:
    """The summary table printed at the end of ``unite eval``: accuracy (and the mean over subjects
    where the task has subjects), number of examples, tokens and tokens per second."""
    header = ["task", "accuracy", "subject mean", "examples", "tokens", "tokens/s"]
    rows = [
        [
            r.task,
            f"{100 * r.metrics['accuracy']:.2f}%",
            f"{100 * r.metrics['subject_accuracy']:.2f}%" if "subject_accuracy" in r.metrics else "-",
            str(len(r.records)),
            str(r.tokens),
            f"{r.tokens_per_second:.1f}",
        ]
        for r in results
    ]
    return format_table(header, rows)


def format_categories(result: EvalResult) -> str:
    """The accuracy of each category of a task with categories (MMLU, CMMLU), as a table; "" without."""
    rows = [
        [name.removeprefix(CATEGORY_METRIC), f"{100 * value:.2f}%"]
        for name, value in result.metrics.items()
        if name.startswith(CATEGORY_METRIC)
    ]
    return format_table([f"{result.task} category", "accuracy"], rows) if rows else ""
