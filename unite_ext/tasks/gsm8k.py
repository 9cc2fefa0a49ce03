"""GSM8K: grade-school maths word problems, 4-shot chain of thought, scored by the final number."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from unite_ext.tasks.base import Example, Score, Task, cut_at_stop, read_records, require

# A number as written in problems and answers: optional minus sign, thousands separators, decimals.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)
_CALCULATOR_NOTE = re.compile(r"<<[^>]*>>")

# The first four chain-of-thought exemplars of Wei et al. (2022), "Chain-of-Thought Prompting Elicits
# Reasoning in Large Language Models", the customary few-shot prompt for GSM8K.
DEFAULT_EXEMPLARS: tuple[tuple[str, str], ...] = (
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they "
        "are done, there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So there "
        "must have been 21 - 15 = 6. The answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking "
        "lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left "
        "in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After "
        "eating 35, they had 74 - 35 = 39. The answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many "
        "lollipops did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny "
        "20 - 12 = 8. The answer is 8.",
    ),
)


def parse_number(text: str) -> Decimal:
    """The value of a number string such as ``"1,234"``, ``"$18"``, ``"-3.50"`` or ``"18."``."""
    cleaned = text.strip().replace(",", "").lstrip("$").rstrip(".")
    try:
        return Decimal(cleaned)
    except InvalidOperation as error:
        raise ValueError(f"not a number: {text!r}") from error


def gold_answer(answer: str | int | float) -> str:
    """The gold number of a GSM8K answer, as a plain number string (no separators).

    Accepts the release's ``"... #### 1,234"``, the chain-of-thought ``"... The answer is 1234."``, and a
    bare number (string or JSON number).
    """
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return str(answer)
    if not isinstance(answer, str):
        raise ValueError(f"GSM8K answer must be a string or a number, got {type(answer).__name__}")
    if "####" in answer:
        tail = answer.rsplit("####", 1)[1]
    elif _ANSWER_IS.search(answer):
        tail = answer[list(_ANSWER_IS.finditer(answer))[-1].end() :]
    elif _NUMBER.fullmatch(answer.strip().lstrip("$")):
        tail = answer
    else:
        raise ValueError(f"GSM8K answer has neither '#### N' nor 'The answer is N': {answer!r}")
    number = _NUMBER.search(tail)
    if number is None:
        raise ValueError(f"no number after the answer marker in GSM8K answer {answer!r}")
    return number.group().replace(",", "")


def predicted_number(response: str) -> str | None:
    """The model's numeric answer: the first number after the first "The answer is" when the response
    has one, else the final number of the response; ``None`` when there is no number."""
    marker = _ANSWER_IS.search(response)
    if marker is not None:
        number = _NUMBER.search(response, marker.end())
        if number is not None:
            return number.group().replace(",", "")
    numbers = _NUMBER.findall(response)
    return numbers[-1].replace(",", "") if numbers else None


def chain_of_thought(answer: str) -> str:
    """A GSM8K release answer (steps with ``<<...>>`` calculator notes, then ``#### N``) rewritten as
    one chain-of-thought paragraph ending in ``"The answer is N."``."""
    steps = answer.rsplit("####", 1)[0]
    steps = " ".join(line.strip() for line in _CALCULATOR_NOTE.sub("", steps).splitlines() if line.strip())
    return f"{steps} The answer is {gold_answer(answer)}."


def question_block(question: str) -> str:
    """The part of the prompt that poses one question."""
    return f"Question: {question.strip()}\nAnswer:"


class Gsm8k(Task):
    """GSM8K (Cobbe et al., 2021): 4-shot chain of thought; correct when the predicted number equals the
    gold number (``18``, ``18.0`` and ``18.00`` are equal)."""

    name = "gsm8k"
    num_fewshot = 4
    max_new_tokens = 256
    stop = ("Question:",)

    def exemplars(self, fewshot: Path | None) -> list[tuple[str, str]]:
        """The solved examples: the built-in ones, or the first four of a GSM8K-format file."""
        if fewshot is None:
            return list(DEFAULT_EXEMPLARS)
        records = read_records(fewshot)[: self.num_fewshot]
        if len(records) < self.num_fewshot:
            raise ValueError(f"--fewshot {fewshot}: need {self.num_fewshot} examples, found {len(records)}")
        return [
            (
                require(r, "question", f"{fewshot} example {i}"),
                chain_of_thought(require(r, "answer", f"{fewshot} example {i}")),
            )
            for i, r in enumerate(records)
        ]

    def header(self, fewshot: Path | None = None) -> str:
        """The solved examples that precede every question."""
        return "".join(f"{question_block(q)} {a}\n\n" for q, a in self.exemplars(fewshot))

    def load(self, data: Path, fewshot: Path | None = None) -> list[Example]:
        header = self.header(fewshot)
        examples = []
        for index, record in enumerate(read_records(data)):
            where = f"{data} record {index}"
            examples.append(
                Example(
                    id=str(record.get("id", index)),
                    prompt=header + question_block(require(record, "question", where)),
                    gold=gold_answer(require(record, "answer", where)),
                )
            )
        return examples

    def score(self, response: str, example: Example) -> Score:
        extracted = predicted_number(cut_at_stop(response, self.stop))
        correct = extracted is not None and parse_number(extracted) == parse_number(str(example.gold))
        return Score(extracted, correct)
