"""Benchmark tasks: reading the published file layouts, prompts, scoring and the evaluation loop."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from unite_ext.tasks import TASKS, Example, get_task
from unite_ext.tasks.base import cut_at_stop, first_option_letter
from unite_ext.tasks.evaluation import evaluate, format_summary, read_output
from unite_ext.tasks.gsm8k import chain_of_thought, gold_answer, predicted_number
from unite_ext.tasks.open_qa import answer_matches, normalize_answer


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    ("answer", "gold"),
    [
        ("Tom has 3 apples.\nHe buys 4 more: 3+4=<<3+4=7>>7.\n#### 7", "7"),
        ("Total is 1000+234=<<1000+234=1234>>1234\n#### 1,234", "1234"),  # separator in the label
        ("So she pays 2 * 9 = 18 dollars. The answer is 18.", "18"),  # chain-of-thought labels
        ("First 5 and 6 ... the answer is -3.5", "-3.5"),
        ("42", "42"),
        (42, "42"),
    ],
)
def test_gsm8k_gold_formats(answer, gold):
    assert gold_answer(answer) == gold


@pytest.mark.parametrize("answer", ["no number here", "#### ", "The answer is unknown", ["7"]])
def test_gsm8k_gold_without_number_is_an_error(answer):
    with pytest.raises(ValueError):
        gold_answer(answer)


@pytest.mark.parametrize(
    ("response", "number"),
    [
        ("3 + 4 = 7. The answer is 7.", "7"),
        ("He had 20 and gave 8 away, 12 left. The answer is 12. Then 99 more", "12"),
        ("The answer is $1,234.", "1234"),
        ("She earns 5 per hour for 3 hours, so 15", "15"),  # no marker: the final number
        ("It costs 2.50 dollars", "2.50"),
        ("The answer is -4", "-4"),
        ("no digits", None),
        ("", None),
    ],
)
def test_gsm8k_predicted_number(response, number):
    assert predicted_number(response) == number


def gsm8k_example(gold: str) -> Example:
    return Example(id="0", prompt="", gold=gold)


@pytest.mark.parametrize(
    ("response", "gold", "correct"),
    [
        ("So 18.00 in all. The answer is 18.", "18", True),  # numeric, not textual, equality
        ("The answer is 18.0", "18", True),
        ("The answer is 1,000.", "1000", True),
        ("The answer is 17.", "18", False),
        ("I do not know.", "18", False),
        ("The answer is 5.\n\nQuestion: There are 18 birds", "5", True),  # cut at the next question
        ("6 and then 18\n\nQuestion: how many? 5", "18", True),
    ],
)
def test_gsm8k_score(response, gold, correct):
    score = get_task("gsm8k").score(response, gsm8k_example(gold))
    assert score.correct is correct


@pytest.mark.parametrize(
    ("response", "options", "letter"),
    [
        (" B", "ABCD", "B"),
        ("The answer is C.", "ABCD", "C"),  # the 'A' of 'answer' is inside a word
        ("(D) because it is", "ABCD", "D"),
        ("答案是B。", "ABCD", "B"),  # Chinese characters around the letter
        ("A. first, not B", "ABCD", "A"),
        ("E", "ABCD", None),  # not an option of this question
        ("E", "ABCDE", "E"),
        ("none of these", "ABCD", None),
        ("", "AB", None),
    ],
)
def test_first_option_letter(response, options, letter):
    assert first_option_letter(response, tuple(options)) == letter


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an  apple, a   day ", "apple day"),
        ("Theatre", "theatre"),  # articles only as whole words
        ("U.S.A.", "usa"),  # punctuation is deleted, so the last letter is no article
        ("«Paris»", "paris"),
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


@pytest.mark.parametrize(
    ("prediction", "aliases", "correct"),
    [
        ("Paris", ["Paris"], True),
        ("the city of Paris.", ["Paris"], True),  # alias contained as words
        ("Parisian", ["Paris"], False),  # not as a whole word
        ("1955", ["5"], False),
        ("Mount Everest", ["Everest", "Chomolungma"], True),
        ("", ["Paris"], False),  # the published code counted an empty prediction as right
        ("   ", ["Paris"], False),
        ("the", ["The"], False),  # both normalise to nothing
        ("anything", [""], False),  # an empty alias matches nothing
        ("London", ["Paris", "Ville Lumière"], False),
    ],
)
def test_answer_matches(prediction, aliases, correct):
    assert answer_matches(prediction, aliases) is correct


def test_open_qa_score_takes_the_first_line():
    task = get_task("triviaqa")
    example = Example(id="0", prompt="", gold=["Paris"])
    assert task.score(" Paris\nQuestion: what about London?", example).correct
    assert not task.score(" London\nParis", example).correct
    score = task.score("\nParis", example)  # an empty first line is an empty prediction
    assert score.extracted == "" and not score.correct


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("a\n\nb Question: c", ["Question:", "\n\n"]) == "a"
    assert cut_at_stop("abc", ["x"]) == "abc"


def test_mmlu_means_over_questions_and_over_subjects():
    # 3/4 right in algebra, 0/1 in law, 1/1 in art: 4 of 6 questions; subjects 0.75, 0, 1.
    correct = {"algebra": [1, 1, 1, 0], "law": [0], "art": [1]}
    records = [{"subject": s, "correct": bool(c)} for s, cs in correct.items() for c in cs]
    metrics = get_task("mmlu").summarize(records)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["subject_accuracy"] == pytest.approx((0.75 + 0 + 1) / 3)
    # The published code averaged running averages: mean of (1, 1, 1, .75, .6, .667) over records.
    running = [sum(r["correct"] for r in records[: i + 1]) / (i + 1) for i in range(len(records))]
    assert metrics["accuracy"] != pytest.approx(sum(running) / len(running))


def test_category_accuracies_are_averaged_as_each_release_does():
    # MMLU's script pools a category's questions: STEM holds algebra 3/4 and astronomy 0/1, so 3/5.
    mmlu = {"abstract_algebra": [1, 1, 1, 0], "astronomy": [0], "philosophy": [1], "my_subject": [0]}
    records = [{"subject": s, "correct": bool(c)} for s, cs in mmlu.items() for c in cs]
    metrics = get_task("mmlu").summarize(records)
    categories = {name: value for name, value in metrics.items() if name.startswith("accuracy/")}
    # Categories without an evaluated subject are left out; a subject outside the release counts in none.
    assert categories == {"accuracy/STEM": pytest.approx(3 / 5), "accuracy/Humanities": pytest.approx(1.0)}
    # CMMLU's averages its subjects' accuracies: STEM holds anatomy 3/4 and astronomy 0/1, so 3/8.
    # Ancient Chinese counts in both Social Science and China specific.
    cmmlu = {"anatomy": [1, 1, 1, 0], "astronomy": [0], "ancient_chinese": [1, 0], "agronomy": [1]}
    records = [{"subject": s, "correct": bool(c)} for s, cs in cmmlu.items() for c in cs]
    metrics = get_task("cmmlu").summarize(records)
    assert {name: value for name, value in metrics.items() if name.startswith("accuracy/")} == {
        "accuracy/STEM": pytest.approx(3 / 8),
        "accuracy/Social Science": pytest.approx(1 / 2),
        "accuracy/Other": pytest.approx(1.0),
        "accuracy/China specific": pytest.approx(1 / 2),
    }


def test_the_category_table_lists_category_metrics_only():
    from unite_ext.tasks.evaluation import EvalResult, format_categories

    metrics = {"accuracy": 0.5, "subject_accuracy": 0.4, "accuracy/STEM": 0.6, "accuracy/Other": 0.25}
    assert format_categories(EvalResult("mmlu", [], metrics, 0, 0.0)).splitlines() == [
        "mmlu category  accuracy",
        "-------------  --------",
        "STEM           60.00%",
        "Other          25.00%",
    ]
    assert format_categories(EvalResult("piqa", [], {"accuracy": 0.5}, 0, 0.0)) == ""


def test_category_tables_cover_each_release():
    from unite_ext.tasks import cmmlu_subjects, mmlu_subjects

    # MMLU: 57 subjects, each in one of four categories (sizes counted by hand in the release's table).
    mmlu = mmlu_subjects.CATEGORIES
    assert {name: len(subjects) for name, subjects in mmlu.items()} == {
        "STEM": 18,
        "Humanities": 13,
        "Social Sciences": 12,
        "Other": 14,
    }
    assert len({s for subjects in mmlu.values() for s in subjects}) == 57
    assert "anatomy" in mmlu["Other"] and "computer_security" in mmlu["STEM"]
    # CMMLU: its 67 subjects, each in one of four categories; 15 of them also "China specific".
    cmmlu = cmmlu_subjects.CATEGORIES
    main = [s for name in ("STEM", "Humanities", "Social Science", "Other") for s in cmmlu[name]]
    assert sorted(main) == sorted(cmmlu_subjects.SUBJECT_NAMES)
    assert set(cmmlu["China specific"]) < set(main) and len(cmmlu["China specific"]) == 15
    assert "anatomy" in cmmlu["STEM"] and "computer_security" in cmmlu["Other"]


def test_cmmlu_summary_has_both_means():
    records = [
        {"subject": "a", "correct": True},
        {"subject": "b", "correct": False},
        {"subject": "b", "correct": False},
    ]
    metrics = get_task("cmmlu").summarize(records)  # subjects outside the release: no category
    assert metrics == {"accuracy": pytest.approx(1 / 3), "subject_accuracy": pytest.approx(0.5)}


# ---------------------------------------------------------------- loading and prompts


def test_gsm8k_prompt_with_default_exemplars(tmp_path):
    data = write_jsonl(
        tmp_path / "test.jsonl",
        [{"question": "Ann has 2 pens and buys 3. How many pens?", "answer": "2+3=<<2+3=5>>5\n#### 5"}],
    )
    (example,) = get_task("gsm8k").load(data)
    assert example.id == "0" and example.gold == "5"
    assert example.prompt.startswith(
        "Question: There are 15 trees in the grove. Grove workers will plant trees in the grove today. "
        "After they are done, there will be 21 trees. How many trees did the grove workers plant today?\n"
        "Answer: There are 15 trees originally. Then there were 21 trees after some more were planted. "
        "So there must have been 21 - 15 = 6. The answer is 6.\n\n"
        "Question: If there are 3 cars"
    )
    assert example.prompt.endswith(
        "So he gave Denny 20 - 12 = 8. The answer is 8.\n\n"
        "Question: Ann has 2 pens and buys 3. How many pens?\nAnswer:"
    )
    assert example.prompt.count("Question:") == 5


def test_gsm8k_prompt_with_fewshot_file(tmp_path):
    shots = [
        {
            "question": f"What is {i} plus {i}?",
            "answer": f"Add them.\n{i}+{i}=<<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}",
        }
        for i in range(1, 6)
    ]
    fewshot = write_jsonl(tmp_path / "train.jsonl", shots)
    data = write_jsonl(tmp_path / "test.jsonl", [{"question": "What is 7 plus 1?", "answer": "#### 8"}])
    (example,) = get_task("gsm8k").load(data, fewshot)
    expected = (
        "Question: What is 1 plus 1?\nAnswer: Add them. 1+1=2 The answer is 2.\n\n"
        "Question: What is 2 plus 2?\nAnswer: Add them. 2+2=4 The answer is 4.\n\n"
        "Question: What is 3 plus 3?\nAnswer: Add them. 3+3=6 The answer is 6.\n\n"
        "Question: What is 4 plus 4?\nAnswer: Add them. 4+4=8 The answer is 8.\n\n"
        "Question: What is 7 plus 1?\nAnswer:"
    )
    assert example.prompt == expected
    assert chain_of_thought("a\nb=<<1+1=2>>2\n#### 2") == "a b=2 The answer is 2."


ARC_AI2 = {
    "id": "Q1",
    "question": {
        "stem": "Which gas do plants take in?",
        "choices": [
            {"text": "oxygen", "label": "A"},
            {"text": "carbon dioxide", "label": "B"},
            {"text": "helium", "label": "C"},
        ],
    },
    "answerKey": "B",
}
ARC_HF_NUMERIC = {
    "id": "Q2",
    "question": "What melts ice fastest?",
    "choices": {"text": ["salt", "sand", "wood", "paper"], "label": ["1", "2", "3", "4"]},
    "answerKey": "1",
}


def test_arc_both_layouts_and_numeric_labels(tmp_path):
    data = write_jsonl(tmp_path / "arc.jsonl", [ARC_AI2, ARC_HF_NUMERIC])
    first, second = get_task("arc_challenge").load(data)
    assert first.prompt == (
        "Question: Which gas do plants take in?\nA. oxygen\nB. carbon dioxide\nC. helium\n"
        "Answer with the letter of the correct option.\nAnswer:"
    )
    assert (first.id, first.gold, first.options) == ("Q1", "B", ("A", "B", "C"))
    assert second.prompt == (
        "Question: What melts ice fastest?\nA. salt\nB. sand\nC. wood\nD. paper\n"
        "Answer with the letter of the correct option.\nAnswer:"
    )
    assert (second.gold, second.options) == ("A", ("A", "B", "C", "D"))
    assert get_task("arc_challenge").score(" A", second).correct


def test_arc_bad_answer_key_is_an_error(tmp_path):
    data = write_jsonl(tmp_path / "arc.jsonl", [dict(ARC_AI2, answerKey="E")])
    with pytest.raises(ValueError, match="answerKey"):
        get_task("arc_challenge").load(data)


def test_piqa_labels_file_and_inline_labels(tmp_path):
    records = [
        {"goal": "Keep bread fresh", "sol1": "Seal it in a bag.", "sol2": "Leave it in the sun."},
        {"goal": "Dry wet shoes", "sol1": "Freeze them.", "sol2": "Stuff them with paper."},
    ]
    data = write_jsonl(tmp_path / "valid.jsonl", records)
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    first, second = get_task("piqa").load(data)
    assert first.prompt == (
        "Goal: Keep bread fresh\nA. Seal it in a bag.\nB. Leave it in the sun.\n"
        "Which solution achieves the goal? Answer with the letter of the correct option.\nAnswer:"
    )
    assert (first.gold, second.gold, first.options) == ("A", "B", ("A", "B"))
    inline = write_jsonl(tmp_path / "hf.jsonl", [dict(records[0], label=1)])
    assert get_task("piqa").load(inline)[0].gold == "B"
    missing = write_jsonl(tmp_path / "nolabels.jsonl", records)
    with pytest.raises(ValueError, match="labels"):
        get_task("piqa").load(missing)


def test_zero_shot_tasks_refuse_fewshot(tmp_path):
    data = write_jsonl(tmp_path / "arc.jsonl", [ARC_AI2])
    with pytest.raises(ValueError, match="zero-shot"):
        get_task("arc_challenge").load(data, data)


QA_SHOTS = [
    ("Capital of Peru?", "Lima"),
    ("Author of Hamlet?", "Shakespeare"),
    ("Largest ocean?", "Pacific"),
    ("Planet with rings?", "Saturn"),
    ("Metal that is liquid?", "Mercury"),
    ("Unused sixth?", "x"),
]
QA_HEADER = (
    "Answer these questions with a short answer.\n\n"
    "Question: Capital of Peru?\nAnswer: Lima\n\n"
    "Question: Author of Hamlet?\nAnswer: Shakespeare\n\n"
    "Question: Largest ocean?\nAnswer: Pacific\n\n"
    "Question: Planet with rings?\nAnswer: Saturn\n\n"
    "Question: Metal that is liquid?\nAnswer: Mercury\n\n"
)


def test_triviaqa_release_layout(tmp_path):
    def entry(q, a, aliases, qid):
        return {"Question": q, "QuestionId": qid, "Answer": {"Value": a, "Aliases": aliases}}

    shots = {"Data": [entry(q, a, [a], f"s{i}") for i, (q, a) in enumerate(QA_SHOTS)]}
    (tmp_path / "train.json").write_text(json.dumps(shots))
    data = {"Data": [entry("Which river flows through Cairo?", "Nile", ["Nile", "River Nile"], "tq_1")]}
    (tmp_path / "dev.json").write_text(json.dumps(data))
    (example,) = get_task("triviaqa").load(tmp_path / "dev.json", tmp_path / "train.json")
    assert example.prompt == QA_HEADER + "Question: Which river flows through Cairo?\nAnswer:"
    assert (example.id, example.gold) == ("tq_1", ["Nile", "River Nile"])


def test_triviaqa_hf_layout_and_required_fewshot(tmp_path):
    shots = [
        {"question": q, "question_id": str(i), "answer": {"value": a, "aliases": []}}
        for i, (q, a) in enumerate(QA_SHOTS)
    ]
    fewshot = write_jsonl(tmp_path / "train.jsonl", shots)
    data = write_jsonl(
        tmp_path / "val.jsonl",
        [{"question": "Q?", "question_id": "v1", "answer": {"value": "Yes", "aliases": ["yes", "Y"]}}],
    )
    (example,) = get_task("triviaqa").load(data, fewshot)
    assert example.gold == ["Yes", "yes", "Y"]
    with pytest.raises(ValueError, match="--fewshot"):
        get_task("triviaqa").load(data)
    with pytest.raises(ValueError, match="evaluated file"):
        get_task("triviaqa").load(fewshot, fewshot)


def test_nq_open_layout(tmp_path):
    fewshot = write_jsonl(
        tmp_path / "train.jsonl", [{"question": q, "answer": [a, "other"]} for q, a in QA_SHOTS]
    )
    data = write_jsonl(
        tmp_path / "dev.jsonl",
        [{"question": "who painted the mona lisa", "answer": ["Leonardo da Vinci", "Leonardo"]}],
    )
    (example,) = get_task("nq").load(data, fewshot)
    assert example.prompt == QA_HEADER + "Question: who painted the mona lisa\nAnswer:"
    assert (example.id, example.gold) == ("0", ["Leonardo da Vinci", "Leonardo"])
    assert get_task("nq").score(" Leonardo\n", example).correct


def write_csv(path: Path, rows: list[list[str]]) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)


def test_mmlu_prompt_from_dev_split(tmp_path):
    dev = [[f"Dev question {i}?", "w", "x", "y", "z", "ABCD"[i % 4]] for i in range(6)]
    write_csv(tmp_path / "dev" / "home_cooking_dev.csv", dev)
    write_csv(
        tmp_path / "test" / "home_cooking_test.csv",
        [["Boil water at sea level, in C?", "90", "100", "110", "120", "B"]],
    )
    write_csv(tmp_path / "dev" / "knots_dev.csv", dev)
    write_csv(
        tmp_path / "test" / "knots_test.csv",
        [["Q1?", "a", "b", "c", "d", "d"], ["Q2, with comma?", "a", "b", "c", "d", "A"]],
    )
    examples = get_task("mmlu").load(tmp_path / "test")
    assert [e.id for e in examples] == ["home_cooking/0", "knots/0", "knots/1"]
    assert [e.subject for e in examples] == ["home_cooking", "knots", "knots"]
    assert [e.gold for e in examples] == ["B", "D", "A"]  # lower-case answer letters are accepted
    expected = (
        "The following are multiple choice questions (with answers) about home cooking.\n\n"
        + "".join(f"Dev question {i}?\nA. w\nB. x\nC. y\nD. z\nAnswer: {'ABCD'[i % 4]}\n\n" for i in range(5))
        + "Boil water at sea level, in C?\nA. 90\nB. 100\nC. 110\nD. 120\nAnswer:"
    )
    assert examples[0].prompt == expected


def test_mmlu_missing_fewshot_subject_is_an_error(tmp_path):
    write_csv(tmp_path / "dev" / "a_dev.csv", [["q", "1", "2", "3", "4", "A"]] * 5)
    write_csv(tmp_path / "test" / "b_test.csv", [["q", "1", "2", "3", "4", "A"]])
    with pytest.raises(ValueError, match="subject 'b'"):
        get_task("mmlu").load(tmp_path / "test")


def test_cmmlu_prompt_with_header_row(tmp_path):
    header = ["", "Question", "A", "B", "C", "D", "Answer"]
    dev = [header] + [[str(i), f"问题{i}", "甲", "乙", "丙", "丁", "C"] for i in range(5)]
    write_csv(tmp_path / "dev" / "agronomy.csv", dev)
    write_csv(
        tmp_path / "test" / "agronomy.csv",
        [header, ["0", "水稻属于哪一科？", "禾本科", "豆科", "菊科", "十字花科", "A"]],
    )
    (example,) = get_task("cmmlu").load(tmp_path / "test")
    expected = (  # the release's script names the subject in Chinese: agronomy is 农学
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
        + "".join(f"题目：问题{i}\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案是：C\n\n" for i in range(5))
        + "题目：水稻属于哪一科？\nA. 禾本科\nB. 豆科\nC. 菊科\nD. 十字花科\n答案是："
    )
    assert example.prompt == expected
    assert (example.id, example.gold, example.subject) == ("agronomy/0", "A", "agronomy")
    assert get_task("cmmlu").score("A", example).correct


def test_cmmlu_subject_names():
    from unite_ext.tasks.cmmlu_subjects import SUBJECT_NAMES

    # The release has 67 subjects, each with its own Chinese name; a few checked by hand.
    assert len(SUBJECT_NAMES) == 67 and len(set(SUBJECT_NAMES.values())) == 67
    assert (SUBJECT_NAMES["high_school_physics"], SUBJECT_NAMES["logical"]) == ("高中物理学", "逻辑学")
    task = get_task("cmmlu")
    assert task.header("traditional_chinese_medicine").startswith("以下是关于中医中药的单项选择题")
    # A subject outside the release is named by its folder, underscores as spaces.
    assert task.header("my_subject").startswith("以下是关于my subject的单项选择题")


CMMLU_HEADER = ["", "Question", "A", "B", "C", "D", "Answer"]
CMMLU_DEV = [[f"问题{i}", "甲", "乙", "丙", "丁", "ABCD"[i % 4]] for i in range(6)]
CMMLU_TEST = {
    "agronomy": [
        ["水稻属于哪一科？", "禾本科", "豆科", "菊科", "十字花科", "A"],
        ["第二题", "1", "2", "3", "4", "D"],
    ],
    "arts": [["《红楼梦》的作者是谁？", "曹雪芹", "罗贯中", "吴承恩", "施耐庵", "A"]],
}


@pytest.mark.parametrize("layout", ["shards", "converted"])
def test_cmmlu_hub_folders_match_the_csv_release(tmp_path, layout):
    # The CSV path's prompt is checked by hand above; the hub's per-subject folders (one configuration
    # per subject, no subject column) of the same rows must give the same examples.
    parquet = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    def numbered(rows: list[list[str]]) -> list[list[str]]:  # the release's CSV: header, row numbers
        return [CMMLU_HEADER] + [[str(i), *row] for i, row in enumerate(rows)]

    columns = CMMLU_HEADER[1:]
    for subject, rows in CMMLU_TEST.items():
        write_csv(tmp_path / "release" / "dev" / f"{subject}.csv", numbered(CMMLU_DEV))
        write_csv(tmp_path / "release" / "test" / f"{subject}.csv", numbered(rows))
        for split, split_rows in (("test", rows), ("dev", CMMLU_DEV)):
            records = [dict(zip(columns, row, strict=True)) for row in split_rows]
            if layout == "shards":  # <subject>/<split>-0000k-of-00002.parquet, the first shard one row
                folder = tmp_path / "hub" / subject
                folder.mkdir(parents=True, exist_ok=True)
                for shard, part in enumerate((records[:1], records[1:])):
                    name = f"{split}-{shard:05d}-of-00002.parquet"
                    parquet.write_table(pyarrow.Table.from_pylist(part or records[:0]), folder / name)
            else:  # <subject>/<split>/0000.parquet, as the hub converts a dataset
                folder = tmp_path / "hub" / subject / split
                folder.mkdir(parents=True, exist_ok=True)
                parquet.write_table(pyarrow.Table.from_pylist(records), folder / "0000.parquet")
    task = get_task("cmmlu")
    from_csv = task.load(tmp_path / "release" / "test")
    assert [e.id for e in from_csv] == ["agronomy/0", "agronomy/1", "arts/0"]
    assert task.load(tmp_path / "hub") == from_csv
    with pytest.raises(ValueError, match="leave out --fewshot"):
        task.load(tmp_path / "hub", tmp_path / "release" / "dev")


def test_cmmlu_hub_folders_bad_records_are_named(tmp_path):
    record = {"Question": "q", "A": "1", "B": "2", "C": "3", "D": "4", "Answer": "A"}
    (tmp_path / "hub" / "arts").mkdir(parents=True)
    write_jsonl(tmp_path / "hub" / "arts" / "dev.jsonl", [record] * 4)
    write_jsonl(tmp_path / "hub" / "arts" / "test.jsonl", [record])
    with pytest.raises(ValueError, match=r"hub: 4 solved examples of subject 'arts', need 5"):
        get_task("cmmlu").load(tmp_path / "hub")
    write_jsonl(tmp_path / "hub" / "arts" / "dev.jsonl", [record] * 5)
    write_jsonl(tmp_path / "hub" / "arts" / "test.jsonl", [record, dict(record, Answer="E")])
    with pytest.raises(ValueError, match=r"test.jsonl record 1: answer must be one of A-D"):
        get_task("cmmlu").load(tmp_path / "hub")
    write_jsonl(tmp_path / "hub" / "arts" / "test.jsonl", [{k: v for k, v in record.items() if k != "D"}])
    with pytest.raises(ValueError, match=r"test.jsonl record 0: missing field 'D'"):
        get_task("cmmlu").load(tmp_path / "hub")


MMLU_DEV = [[f"Dev question {i} of {{}}?", "w", "x", "y", "z", "ABCD"[i % 4]] for i in range(6)]
MMLU_TEST = {
    "knots": [["Q1?", "a", "b", "c", "d", "d"], ["Q2, with comma?", "a", "b", "c", "d", "A"]],
    "home_cooking": [["Boil water at sea level, in C?", "90", "100", "110", "120", "B"]],
}


def mmlu_hub_record(subject: str, row: list[str], index_answer: bool) -> dict:
    """A CSV row of the MMLU release in the Hugging Face hub's layout (answer as index or letter)."""
    answer = row[5].upper()
    return {
        "question": row[0],
        "subject": subject,
        "choices": row[1:5],
        "answer": "ABCD".index(answer) if index_answer else answer,
    }


def test_mmlu_hub_layout_matches_the_csv_release(tmp_path):
    # The CSV path's prompts are checked by hand above; the hub's records of the same questions (subjects
    # interleaved, answers as indices and as letters) must give the same examples.
    for subject, rows in MMLU_TEST.items():
        write_csv(tmp_path / "dev" / f"{subject}_dev.csv", [[r[0].format(subject), *r[1:]] for r in MMLU_DEV])
        write_csv(tmp_path / "test" / f"{subject}_test.csv", rows)
    from_csv = get_task("mmlu").load(tmp_path / "test")
    test_records = [
        mmlu_hub_record(subject, row, index_answer=i % 2 == 0)
        for i, (subject, row) in enumerate(
            [("knots", MMLU_TEST["knots"][0]), ("home_cooking", MMLU_TEST["home_cooking"][0])]
            + [("knots", MMLU_TEST["knots"][1])]
        )
    ]
    dev_records = [
        mmlu_hub_record(subject, [row[0].format(subject), *row[1:]], index_answer=True)
        for row in MMLU_DEV
        for subject in MMLU_TEST
    ]
    data = write_jsonl(tmp_path / "test.jsonl", test_records)
    fewshot = write_jsonl(tmp_path / "dev.jsonl", dev_records)
    from_records = get_task("mmlu").load(data, fewshot)
    assert [e.id for e in from_csv] == ["home_cooking/0", "knots/0", "knots/1"]
    assert from_records == from_csv
    assert from_csv[0].prompt.count("Dev question") == 5


@pytest.mark.parametrize("name", ["mmlu", "cmmlu"])
def test_a_limited_run_takes_every_subjects_first_questions_in_turn(name):
    # Subjects a (3 questions), b (1), c (2), in load order. Turns: a0 b0 c0, then a1 c1, then a2.
    sizes = {"a": 3, "b": 1, "c": 2}
    examples = [
        Example(id=f"{s}/{i}", prompt="", gold="A", subject=s) for s, n in sizes.items() for i in range(n)
    ]
    task = get_task(name)
    ids = {count: [e.id for e in task.first(examples, count)] for count in (1, 3, 4, 5, 6, 9)}
    assert ids[1] == ["a/0"]
    assert ids[3] == ["a/0", "b/0", "c/0"]
    assert ids[4] == ["a/0", "a/1", "b/0", "c/0"]
    assert ids[5] == ["a/0", "a/1", "b/0", "c/0", "c/1"]
    assert ids[6] == ids[9] == [e.id for e in examples]
    # Other tasks take the first questions.
    assert [e.id for e in get_task("gsm8k").first(examples, 4)] == ["a/0", "a/1", "a/2", "b/0"]


def test_limit_on_the_command_line_covers_every_subject(tmp_path):
    import argparse

    from unite_ext.cli import load_examples

    for subject in ("algebra", "knots"):  # two questions each
        write_csv(tmp_path / "dev" / f"{subject}_dev.csv", [[r[0].format(subject), *r[1:]] for r in MMLU_DEV])
        write_csv(tmp_path / "test" / f"{subject}_test.csv", MMLU_TEST["knots"])
    args = argparse.Namespace(task="mmlu", data=tmp_path / "test", fewshot=None, limit=2)
    _, examples = load_examples(args)
    assert [e.id for e in examples] == ["algebra/0", "knots/0"]  # not the first two, algebra/0 and /1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"choices": ["a", "b", "c"]}, "list of 4 option texts"),
        ({"answer": 4}, "option index 0-3"),
        ({"answer": True}, "option index 0-3"),
        ({"answer": "E"}, "one of A-D"),
        ({"subject": None}, "missing field 'subject'"),
    ],
)
def test_mmlu_hub_layout_bad_records_are_named(tmp_path, change, message):
    record = {"question": "q", "subject": "knots", "choices": ["1", "2", "3", "4"], "answer": 0}
    record = {key: value for key, value in {**record, **change}.items() if value is not None}
    data = write_jsonl(tmp_path / "test.jsonl", [record])
    fewshot = write_jsonl(
        tmp_path / "dev.jsonl", [dict(record, subject="knots", answer=0, choices=["1"] * 4)] * 5
    )
    with pytest.raises(ValueError, match=message) as error:
        get_task("mmlu").load(data, fewshot)
    assert "test.jsonl record 0" in str(error.value)


def test_mmlu_hub_layout_needs_its_fewshot_file(tmp_path):
    record = {"question": "q", "subject": "knots", "choices": ["1", "2", "3", "4"], "answer": 0}
    data = write_jsonl(tmp_path / "test.jsonl", [record])
    with pytest.raises(ValueError, match="--fewshot must be the file of solved examples"):
        get_task("mmlu").load(data)
    with pytest.raises(ValueError, match="--fewshot must be the file"):
        get_task("mmlu").load(data, tmp_path)  # a folder is the CSV release's few-shot source
    other_subject = write_jsonl(tmp_path / "dev.jsonl", [dict(record, subject="chess")] * 5)
    with pytest.raises(ValueError, match="0 solved examples of subject 'knots'"):
        get_task("mmlu").load(data, other_subject)
    too_few = write_jsonl(tmp_path / "dev4.jsonl", [record] * 4)
    with pytest.raises(ValueError, match="4 solved examples of subject 'knots', need 5"):
        get_task("mmlu").load(data, too_few)
    with pytest.raises(ValueError, match="cmmlu must be a split folder"):
        get_task("cmmlu").load(data, too_few)


HUB_FILES = {
    # task: (evaluated records, few-shot records or None), in the Hugging Face hub's layouts
    "gsm8k": (
        [{"question": "Ann has 2 pens and buys 3. How many?", "answer": "2+3=<<2+3=5>>5\n#### 5"}],
        None,
    ),
    "arc_challenge": ([ARC_HF_NUMERIC, dict(ARC_HF_NUMERIC, id="Q3", answerKey="4")], None),
    "piqa": ([{"goal": "Dry wet shoes", "sol1": "Freeze them.", "sol2": "Stuff them.", "label": 1}], None),
    "triviaqa": (
        [{"question": "Q?", "question_id": "v1", "answer": {"value": "Yes", "aliases": ["yes", "Y"]}}],
        [
            {"question": q, "question_id": str(i), "answer": {"value": a, "aliases": [a]}}
            for i, (q, a) in enumerate(QA_SHOTS)
        ],
    ),
    "nq": (
        [{"question": "who painted the mona lisa", "answer": ["Leonardo"]}],
        [{"question": q, "answer": [a]} for q, a in QA_SHOTS],
    ),
    "mmlu": (
        [mmlu_hub_record("knots", row, index_answer=True) for row in MMLU_TEST["knots"]],
        [mmlu_hub_record("knots", row, index_answer=True) for row in MMLU_DEV],
    ),
}


@pytest.mark.parametrize("task", sorted(HUB_FILES))
def test_parquet_files_read_like_jsonl(tmp_path, task):
    parquet = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    def write_both(name: str, records: list[dict]) -> tuple[Path, Path]:
        parquet.write_table(pyarrow.Table.from_pylist(records), tmp_path / f"{name}.parquet")
        return write_jsonl(tmp_path / f"{name}.jsonl", records), tmp_path / f"{name}.parquet"

    records, shots = HUB_FILES[task]
    data = write_both("test", records)
    fewshot = (None, None) if shots is None else write_both("train", shots)
    from_jsonl = get_task(task).load(data[0], fewshot[0])
    from_parquet = get_task(task).load(data[1], fewshot[1])
    assert len(from_jsonl) == len(records)
    assert from_parquet == from_jsonl


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "test.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="needs pyarrow"):
        get_task("gsm8k").load(path)
    with pytest.raises(ValueError, match=r"use \.jsonl, \.json or \.parquet"):
        get_task("gsm8k").load(path.rename(tmp_path / "test.csv"))


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        get_task("squad")
    assert set(TASKS) == {"gsm8k", "arc_challenge", "piqa", "triviaqa", "nq", "mmlu", "cmmlu"}


# ---------------------------------------------------------------- evaluation loop


@dataclass
class FakeGeneration:
    text: str
    num_steps: int


class ScriptedGenerator:
    """Answers each prompt with a fixed response; records the prompts it was asked."""

    def __init__(self, responses: dict[str, str]):
        self.responses = responses
        self.asked: list[str] = []

    def __call__(self, prompts, *, max_new_tokens, stop):
        self.asked.extend(prompts)
        return [FakeGeneration(self.responses[p], num_steps=len(self.responses[p].split())) for p in prompts]


def arc_data(tmp_path: Path, n: int) -> Path:
    records = [
        {
            "id": f"q{i}",
            "question": f"Pick {i}",
            "choices": {"text": ["x", "y"], "label": ["A", "B"]},
            "answerKey": "AB"[i % 2],
        }
        for i in range(n)
    ]
    return write_jsonl(tmp_path / "arc.jsonl", records)


def test_evaluate_writes_records_and_resumes(tmp_path):
    task = get_task("arc_challenge")
    examples = task.load(arc_data(tmp_path, 5))
    # Right on q0, q1, q3; q2 answers the wrong letter, q4 answers no letter.
    answers = {"q0": " A", "q1": " B", "q2": " B", "q3": " B is it", "q4": " no idea"}
    responses = {e.prompt: answers[e.id] for e in examples}
    out = tmp_path / "out.jsonl"

    first = ScriptedGenerator(responses)
    evaluate(task, examples[:2], first, out, batch_size=2, progress=False)
    assert len(first.asked) == 2
    second = ScriptedGenerator(responses)
    result = evaluate(task, examples, second, out, batch_size=2, progress=False)
    assert second.asked == [e.prompt for e in examples[2:]]  # only what was missing
    assert result.metrics == {"accuracy": pytest.approx(3 / 5)}
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["q0", "q1", "q2", "q3", "q4"]
    q3 = lines[3]
    assert (q3["prediction"], q3["extracted"], q3["gold"], q3["correct"], q3["tokens"]) == (
        " B is it",
        "B",
        "B",
        True,
        3,
    )
    assert lines[4]["extracted"] is None and not lines[4]["correct"]
    assert set(q3) >= {"id", "prompt", "prediction", "extracted", "gold", "correct", "tokens", "seconds"}
    assert result.tokens == sum(r["tokens"] for r in lines)
    assert "60.00%" in format_summary([result])

    third = ScriptedGenerator(responses)  # everything done: nothing generated again
    again = evaluate(task, examples, third, out, progress=False)
    assert third.asked == [] and again.metrics == result.metrics


def test_resume_drops_a_cut_off_last_line(tmp_path):
    task = get_task("arc_challenge")
    examples = task.load(arc_data(tmp_path, 3))
    responses = {e.prompt: " A" for e in examples}
    out = tmp_path / "out.jsonl"
    evaluate(task, examples[:2], ScriptedGenerator(responses), out, progress=False)
    complete = out.read_text()
    out.write_text(complete + '{"id": "q2", "prom')  # killed while writing
    assert len(read_output(out)) == 2 and out.read_text() == complete
    generator = ScriptedGenerator(responses)
    result = evaluate(task, examples, generator, out, progress=False)
    assert generator.asked == [examples[2].prompt] and len(result.records) == 3


def test_resume_refuses_another_run_or_prompt(tmp_path):
    task = get_task("arc_challenge")
    examples = task.load(arc_data(tmp_path, 2))
    responses = {e.prompt: " A" for e in examples}
    out = tmp_path / "out.jsonl"
    evaluate(task, examples, ScriptedGenerator(responses), out, run={"models": ["a"]}, progress=False)
    with pytest.raises(ValueError, match="different run"):
        evaluate(task, examples, ScriptedGenerator(responses), out, run={"models": ["b"]}, progress=False)
    changed = [Example(e.id, e.prompt + " changed", e.gold, e.options) for e in examples]
    with pytest.raises(ValueError, match="different prompt"):
        evaluate(task, changed, ScriptedGenerator({}), out, run={"models": ["a"]}, progress=False)


def test_resume_refuses_a_corrupt_middle_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_output(out)
