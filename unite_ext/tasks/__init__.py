"""Benchmarks of the UNITE paper, read from local files in the layouts the datasets are published in.

``--data`` is what is evaluated; ``--fewshot`` is where solved examples come from. Every JSONL file
below may also be JSON (a list of records) or Parquet (the Hugging Face hub's files; needs ``pyarrow``).

========================  =====================================================================  ==========
task                      ``--data`` (and ``--fewshot``)                                         shots
========================  =====================================================================  ==========
``gsm8k``                 JSONL, ``{"question": str, "answer": str}``; the gold number is read   4, chain of
                          from ``"... #### 1,234"``, ``"... The answer is 1234."`` or a bare     thought
                          number. ``--fewshot``: a GSM8K-format file (first 4 used, rewritten
                          as "... The answer is N."); default: Wei et al. (2022)'s exemplars
``arc_challenge``         JSONL/JSON, the AI2 release ``{"id", "question": {"stem", "choices":   0
                          [{"text", "label"}]}, "answerKey"}`` or the Hugging Face layout
                          ``{"id", "question": str, "choices": {"text": [], "label": []},
                          "answerKey"}``; labels 1-4 are relabelled A-D
``piqa``                  JSONL ``{"goal", "sol1", "sol2"}`` with ``"label"`` (0/1) in each      0
                          record or in ``<name>-labels.lst`` beside ``<name>.jsonl``
``triviaqa``              JSON ``{"Data": [{"Question", "QuestionId", "Answer": {"Value",        5
                          "Aliases"}}]}`` (the release) or JSONL ``{"question", "question_id",
                          "answer": {"value", "aliases"}}``; ``--fewshot`` required (first 5)
``nq``                    JSONL ``{"question", "answer": [str, ...]}`` (NQ-Open);                5
                          ``--fewshot`` required (first 5)
``mmlu``                  a split folder (``data/test/``) of ``<subject>_test.csv`` without a    5 per
                          header: question, A, B, C, D, answer; few-shot from ``../dev/``        subject
                          (``<subject>_dev.csv``, first 5 rows) or ``--fewshot DIR``. Or the
                          hub's records ``{"question", "subject", "choices": [4], "answer":
                          0-3}`` with ``--fewshot`` the dev split's file (first 5 per subject)
``cmmlu``                 a split folder (``test/``) of ``<subject>.csv`` with the header         5 per
                          ``,Question,A,B,C,D,Answer``; few-shot from ``../dev/``. Or the hub's   subject
                          folder of ``<subject>/`` folders, each with ``test-*`` and ``dev-*``
                          files of those columns' records (few-shot from ``dev``)
========================  =====================================================================  ==========

Scoring: GSM8K compares the predicted number (the first number after "The answer is", else the final
number of the response) with the gold number numerically; multiple choice takes the first option letter
standing alone in the response; open QA is right when the normalised prediction equals a normalised
alias or contains one as whole words, and an empty prediction is wrong; MMLU/CMMLU report the mean over
questions (``accuracy``), the mean over subjects (``subject_accuracy``) and each category's accuracy
(``accuracy/<category>``, grouped and averaged as each release does). ``docs/tasks.md`` shows the prompts.
"""

from __future__ import annotations

from unite_ext.tasks.base import Example, Score, Task
from unite_ext.tasks.gsm8k import Gsm8k
from unite_ext.tasks.mmlu import Cmmlu, Mmlu
from unite_ext.tasks.multiple_choice import ArcChallenge, Piqa
from unite_ext.tasks.open_qa import NaturalQuestions, TriviaQa

TASKS: dict[str, type[Task]] = {
    task.name: task for task in (Gsm8k, ArcChallenge, Piqa, TriviaQa, NaturalQuestions, Mmlu, Cmmlu)
}


def get_task(name: str) -> Task:
    """The task called ``name`` (one of :data:`TASKS`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]()


__all__ = ["TASKS", "Example", "Score", "Task", "get_task"]
