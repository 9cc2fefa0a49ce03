"""The ``unite`` command end to end on tiny random models saved to a temporary folder, and spec files."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny_models import save_tiny_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from unite_ext.cli import main, model_specs
from unite_ext.model_spec import ModelSpec, load_spec, uses_chat, write_spec
from unite_ext.tasks import get_task


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "byte": save_tiny_checkpoint(root / "byte", "byte", seed=1),
        "sp": save_tiny_checkpoint(root / "sp", "sentencepiece", seed=2),
    }


@pytest.fixture(autouse=True)
def table_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITE_EXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture()
def piqa_file(tmp_path) -> Path:
    goals = ["Open a jar", "Dry a shirt", "Cool tea", "Light a room", "Stop a leak", "Sharpen a knife"]
    records = [
        {"goal": g, "sol1": "Use water.", "sol2": "Use a stone.", "label": i % 2} for i, g in enumerate(goals)
    ]
    path = tmp_path / "piqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@functools.cache
def load_checkpoint(folder: Path) -> tuple[Any, Any]:
    return AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()


def hf_greedy_text(folder: Path, prompt: str, max_new_tokens: int, stop: list[str]) -> str:
    """Reference: the model's own greedy generation with Hugging Face ``generate``, cut at ``stop``."""
    tokenizer, model = load_checkpoint(folder)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        output = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    text = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
    for s in stop:
        text = text.split(s)[0]
    return text


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_single_model_matches_hf_generate(checkpoints, tmp_path, capsys):
    questions = [f"A shop sells {n} pens a day. How many pens in {n + 1} days?" for n in range(2, 8)]
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "#### 0"}) + "\n" for q in questions))
    prompts = [e.prompt for e in get_task("gsm8k").load(data)]
    references = [hf_greedy_text(checkpoints["byte"], p, 24, ["Question:"]) for p in prompts]
    # Gold answers: the final number of the model's own response for even rows, a number it never says for
    # odd rows; so exactly the even rows whose response holds a number are right.
    finals = [re.findall(r"\d+", text) for text in references]
    golds = [f[-1] if i % 2 == 0 and f else "987654" for i, f in enumerate(finals)]
    expected = [i % 2 == 0 and bool(f) for i, f in enumerate(finals)]
    assert any(expected), "the reference responses hold no number; pick other questions"
    answers = [{"question": q, "answer": f"#### {g}"} for q, g in zip(questions, golds, strict=True)]
    data.write_text("".join(json.dumps(a) + "\n" for a in answers))

    out = tmp_path / "single.jsonl"
    status = main(
        ["eval", "--task", "gsm8k", "--data", str(data), "--model", str(checkpoints["byte"]),
         "--sync", "fast", "--max-new-tokens", "24", "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert status == 0
    records = read_lines(out)
    assert [r["prediction"] for r in records] == references
    assert [r["correct"] for r in records] == expected
    assert [r["gold"] for r in records] == golds
    assert all(1 <= r["tokens"] <= 24 and r["seconds"] > 0 for r in records)
    summary = capsys.readouterr().out
    accuracy = 100 * sum(expected) / len(expected)
    assert re.search(rf"gsm8k\s+{accuracy:.2f}%\s+-\s+6\s+{sum(r['tokens'] for r in records)}\s", summary)


def test_eval_ensemble_resumes(checkpoints, piqa_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ensemble.jsonl"

    def command(weights: list[str], *extra: str) -> list[str]:
        return ["eval", "--task", "piqa", "--data", str(piqa_file), "--model", str(checkpoints["byte"]),
                "--model", str(checkpoints["sp"]), "--weights", *weights, "--max-new-tokens", "4",
                "--out", str(out), "--no-progress", "--batch-size", "2", *extra]  # fmt: skip

    assert main(command(["0.7", "0.3"], "--limit", "2")) == 0
    first_two = out.read_text()
    assert len(first_two.splitlines()) == 2
    assert main(command(["0.7", "0.3"])) == 0
    text = out.read_text()
    assert text.startswith(first_two)  # the first two records were kept, not generated again
    records = read_lines(out)
    assert [r["id"] for r in records] == [str(i) for i in range(6)]
    assert records[0]["run"]["models"] == [{"path": str(checkpoints["byte"]), "weight": 0.7},
                                           {"path": str(checkpoints["sp"]), "weight": 0.3}]  # fmt: skip
    # Resuming a finished run loads no model.
    with monkeypatch.context() as patch:
        patch.setattr("unite_ext.cli.build_ensemble", lambda *a, **k: pytest.fail("models were loaded"))
        assert main(command(["0.7", "0.3"])) == 0
    assert out.read_text() == text
    # Another ensemble must not append to this file.
    capsys.readouterr()
    assert main(command(["0.5", "0.5"])) == 2
    assert "different run" in capsys.readouterr().err
    assert len(read_lines(out)) == 6


def test_select_writes_a_spec_that_eval_accepts(checkpoints, piqa_file, tmp_path, capsys):
    chosen = tmp_path / "chosen.json"
    work = tmp_path / "work"
    args = ["select", "--task", "piqa", "--data", str(piqa_file), "--candidates", str(checkpoints["byte"]),
            str(checkpoints["sp"]), "--limit", "4", "--max-new-tokens", "4", "--work-dir", str(work),
            "--out", str(chosen), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    table = capsys.readouterr().out
    # Recompute each candidate's figures from its records and apply the rule by hand.
    figures = []
    for index, folder in enumerate([checkpoints["byte"], checkpoints["sp"]]):
        records = read_lines(work / f"candidate-{index}.jsonl")
        assert len(records) == 4 and records[0]["run"]["models"] == [{"path": str(folder)}]
        accuracy = sum(r["correct"] for r in records) / 4
        length = sum(len(r["prediction"].encode()) for r in records) / 4
        figures.append((str(folder), accuracy, length))
        assert f"{100 * accuracy:.2f}%" in table and f"{length:.1f}" in table
    base = max(figures, key=lambda f: f[1])  # first listed wins a tie, as max does
    expected = [
        path
        for path, accuracy, length in figures
        if path == base[0]
        or (accuracy >= 0.9 * base[1] - 1e-12 and max(length, base[2]) <= 2 * min(length, base[2]) + 1e-12)
    ]
    spec = json.loads(chosen.read_text())
    assert [m["path"] for m in spec["models"]] == expected
    assert spec["selection"]["rule"]["gap"] == "relative"
    assert [c["model"] for c in spec["selection"]["candidates"]] == [f[0] for f in figures]
    out = tmp_path / "from_spec.jsonl"
    assert main(["eval", "--task", "piqa", "--data", str(piqa_file), "--model", str(chosen), "--limit", "2",
                 "--max-new-tokens", "2", "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    assert [m["path"] for m in read_lines(out)[0]["run"]["models"]] == expected


def test_generate_streams_the_greedy_text(checkpoints, capsys):
    prompt = "The quick brown fox"
    assert main(["generate", "--model", str(checkpoints["byte"]), "--sync", "fast", "--prompt", prompt,
                 "--max-new-tokens", "12"]) == 0  # fmt: skip
    streamed = capsys.readouterr().out
    assert streamed == hf_greedy_text(checkpoints["byte"], prompt, 12, []) + "\n"


def test_generate_ensemble_with_messages(checkpoints, tmp_path, capsys, monkeypatch):
    from unite_ext.decode import Ensemble, _ModelBatch

    messages = [{"role": "user", "content": "Name a number."}]
    path = tmp_path / "messages.json"
    path.write_text(json.dumps(messages))
    folders = [str(checkpoints["byte"]), str(checkpoints["sp"])]
    widths = []  # of every forward pass, read 3 positions at a time
    read = _ModelBatch._pass
    monkeypatch.setattr(
        _ModelBatch,
        "_pass",
        lambda run, feeds, keep: widths.append(max(map(len, feeds))) or read(run, feeds, keep),
    )
    assert main(["generate", "--model", folders[0], "--model", folders[1], "--messages", str(path),
                 "--max-new-tokens", "10", "--stop", "\n", "--max-pass-tokens", "3"]) == 0  # fmt: skip
    assert max(widths) == 3
    monkeypatch.undo()
    streamed = capsys.readouterr().out
    reference = Ensemble.from_pretrained(folders).generate(
        messages=[messages], max_new_tokens=10, stop=["\n"]
    )
    assert streamed == reference[0].text + "\n"


def test_chat_template_kwargs_reach_the_generation_calls(
    checkpoints, piqa_file, tmp_path, capsys, monkeypatch
):
    from unite_ext.decode import Ensemble

    seen = []
    generate = Ensemble.generate

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("chat_template_kwargs"))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(Ensemble, "generate", spy)
    model, variables = str(checkpoints["byte"]), '{"enable_thinking": false}'
    assert main(["generate", "--model", model, "--chat", "--chat-template-kwargs", variables,
                 "--prompt", "Hi", "--max-new-tokens", "2"]) == 0  # fmt: skip
    out = tmp_path / "chat.jsonl"
    assert main(["eval", "--task", "piqa", "--data", str(piqa_file), "--model", model, "--chat",
                 "--chat-template-kwargs", variables, "--limit", "2", "--max-new-tokens", "2",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    assert seen == [[{"enable_thinking": False}]] * 2
    assert read_lines(out)[0]["run"]["chat_template_kwargs"] == [{"enable_thinking": False}]

    # A spec file's variables update the shared ones for its model only, in every command.
    spec = tmp_path / "spec.json"
    own = {"enable_thinking": True, "style": "short"}
    spec.write_text(json.dumps({"models": [
        {"path": model, "chat_template": True},
        {"path": str(checkpoints["sp"]), "chat_template": True, "chat_template_kwargs": own},
    ]}))  # fmt: skip
    seen.clear()
    assert main(["generate", "--model", str(spec), "--chat-template-kwargs", variables,
                 "--prompt", "Hi", "--max-new-tokens", "2"]) == 0  # fmt: skip
    assert main(["generate", "--model", str(spec), "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    chosen = tmp_path / "chosen.json"
    assert main(["select", "--task", "piqa", "--data", str(piqa_file), "--candidates", str(spec),
                 "--chat-template-kwargs", variables, "--limit", "2", "--max-new-tokens", "2",
                 "--out", str(chosen), "--no-progress"]) == 0  # fmt: skip
    assert seen == [
        [{"enable_thinking": False}, {"enable_thinking": True, "style": "short"}],
        [{}, own],
        [{"enable_thinking": False}],
        [{"enable_thinking": True, "style": "short"}],
    ]

    capsys.readouterr()
    assert main(["generate", "--model", model, "--chat-template-kwargs", variables, "--prompt", "Hi"]) == 2
    assert "--chat-template-kwargs applies to chat templates" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--model", model, "--chat", "--chat-template-kwargs", "[1]", "--prompt", "Hi"])


def test_bench_passes_its_arguments_through(monkeypatch):
    seen = []
    module = types.ModuleType("unite_ext.benchmark")
    module.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "unite_ext.benchmark", module)
    assert main(["bench", "--batch", "4", "--help"]) == 3
    assert seen == [["--batch", "4", "--help"]]


def test_bad_arguments_are_reported(checkpoints, piqa_file, tmp_path, capsys):
    out = str(tmp_path / "x.jsonl")
    model = str(checkpoints["byte"])
    base = ["eval", "--task", "piqa", "--data", str(piqa_file), "--out", out, "--no-progress"]
    assert main([*base, "--model", model, "--weights", "1", "2"]) == 2
    assert "--weights gives 2 numbers for 1 models" in capsys.readouterr().err
    assert main([*base, "--model", model, "--limit", "0"]) == 2
    assert "--limit" in capsys.readouterr().err
    assert main(["generate", "--model", model, "--prompt", "Hi", "--max-pass-tokens", "0"]) == 2
    assert "max_pass_tokens must be an integer >= 1, got 0" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "--task",
                "piqa",
                "--data",
                str(tmp_path / "missing.jsonl"),
                "--model",
                model,
                "--out",
                out,
            ]
        )
        == 2
    )
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--task", "squad", "--data", "x", "--model", model, "--out", out])


# ---------------------------------------------------------------- spec files


def test_yaml_spec_with_per_model_options(tmp_path):
    path = tmp_path / "ensemble.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {
                        "path": "/m/a",
                        "weight": 2,
                        "dtype": "bfloat16",
                        "device_map": "cuda:0",
                        "chat_template": True,
                    },
                    {
                        "path": "/m/b",
                        "weight": 1,
                        "chat_template": "template.jinja",
                        "chat_template_kwargs": {"enable_thinking": False},
                    },
                ]
            }
        )
    )
    a, b = load_spec(path)
    assert a == ModelSpec("/m/a", 2, "bfloat16", "cuda:0", True)
    assert b == ModelSpec("/m/b", 1, "auto", None, "template.jinja", {"enable_thinking": False})
    assert uses_chat([a, b])
    # What `unite select` writes reads back the same.
    write_spec(tmp_path / "again.json", [a, b])
    assert load_spec(tmp_path / "again.json") == [a, b]


def test_spec_files_and_paths_mix_on_the_command_line(tmp_path):
    spec = tmp_path / "two.json"
    spec.write_text(json.dumps({"models": ["/m/a", {"path": "/m/b", "dtype": "float16"}]}))
    specs = model_specs([str(spec), "/m/c"], dtype="bfloat16")
    assert specs == [
        ModelSpec("/m/a"),
        ModelSpec("/m/b", dtype="float16"),
        ModelSpec("/m/c", dtype="bfloat16"),
    ]
    weighted = model_specs([str(spec), "/m/c"], [1, 2, 3])
    assert [s.weight for s in weighted] == [1, 2, 3] and weighted[1].dtype == "float16"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"model": ["/m/a"]}, "'models'"),
        ({"models": []}, "non-empty"),
        ({"models": [{"path": "/m/a", "colour": "red"}]}, "colour"),
        ({"models": [{"weight": 1}]}, "no 'path'"),
        ({"models": [{"path": "/m/a", "dtype": "int8"}]}, "dtype"),
        ({"models": [{"path": "/m/a", "weight": -1}]}, "weight"),
        ({"models": [{"path": "/m/a", "weight": "0.5"}]}, "weight"),
        ({"models": [{"path": "/m/a", "weight": 1}, "/m/b"]}, "every model has a weight or none"),
        ({"models": [{"path": "/m/a", "weight": 0}, {"path": "/m/b", "weight": 0}]}, "all zero"),
        ({"models": [{"path": "/m/a", "chat_template_kwargs": {"x": 1}}]}, "chat_template is false"),
        ({"models": [{"path": "/m/a", "chat_template": True, "chat_template_kwargs": [1]}]}, "mapping"),
    ],
)
def test_bad_spec_files(tmp_path, content, match):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match):
        load_spec(path)


def test_chat_must_be_all_or_none():
    with pytest.raises(ValueError, match="every model or for none"):
        uses_chat([ModelSpec("/m/a", chat_template=True), ModelSpec("/m/b")])
    assert not uses_chat([ModelSpec("/m/a"), ModelSpec("/m/b")])


def test_the_step_and_the_cli_start_without_transformers():
    # Importing transformers takes seconds: only the decoding loop needs it, on first use.
    code = (
        "import sys, unite_ext, unite_ext.cli\n"
        "assert 'transformers' not in sys.modules, 'imported at start'\n"
        "assert unite_ext.Ensemble.__module__ == 'unite_ext.decode' and 'transformers' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
