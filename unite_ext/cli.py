"""The ``unite`` command: ``eval``, ``select``, ``generate``, ``bench`` and ``demo``.

Run ``unite <command> --help`` for the options of each command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unite_ext.defaults import DEFAULT_K, DEFAULT_MAX_PASS_TOKENS, DEFAULT_SYNC
from unite_ext.model_spec import (
    DTYPES,
    ModelSpec,
    build_ensemble,
    ensemble_weights,
    load_spec,
    uses_chat,
    write_spec,
)

SPEC_SUFFIXES = (".json", ".yaml", ".yml")


def model_specs(
    arguments: Sequence[str],
    weights: Sequence[float] | None = None,
    *,
    dtype: str = "auto",
    device_map: str | None = None,
    chat: bool = False,
) -> list[ModelSpec]:
    """The models named on the command line.

    Each argument is a model (a local folder or a hub name), loaded with ``dtype``, ``device_map`` and
    ``chat``; or a spec file (``.json``/``.yaml``/``.yml``) whose models keep their own options. ``weights``,
    when given, sets the weight of every resulting model, in order.
    """
    specs: list[ModelSpec] = []
    for argument in arguments:
        if argument.endswith(SPEC_SUFFIXES) and Path(argument).is_file():
            specs.extend(load_spec(argument))
        else:
            specs.append(ModelSpec(argument, dtype=dtype, device_map=device_map, chat_template=chat))
    if weights is not None:
        if len(weights) != len(specs):
            raise ValueError(f"--weights gives {len(weights)} numbers for {len(specs)} models")
        specs = [dataclasses.replace(s, weight=w) for s, w in zip(specs, weights, strict=True)]
    ensemble_weights(specs)
    return specs


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options on how models given as bare paths are loaded."""
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="weights dtype (default: the checkpoint's)"
    )
    parser.add_argument("--device-map", default=None, help="from_pretrained device_map, e.g. auto or cuda:0")
    parser.add_argument(
        "--chat", action="store_true", help="send each prompt as a user message in the models' chat templates"
    )
    parser.add_argument(
        "--chat-template-kwargs",
        type=json_object,
        default=None,
        metavar="JSON",
        help="variables of every chat template, e.g. '{\"enable_thinking\": false}' (chat templates only; "
        "a spec file's chat_template_kwargs override them for its model)",
    )


def json_object(text: str) -> dict[str, Any]:
    """A JSON object given on the command line."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text}")
    return value


def chat_template_kwargs(args: argparse.Namespace, specs: Sequence[ModelSpec], chat: bool) -> dict[str, Any]:
    """The chat templates' variables as keyword arguments of the generation calls: one dict per model,
    ``--chat-template-kwargs`` updated by the model's own (spec files); none when neither is given."""
    shared = args.chat_template_kwargs
    if shared is None and all(s.chat_template_kwargs is None for s in specs):
        return {}
    if not chat:
        raise ValueError("--chat-template-kwargs applies to chat templates: add --chat (or use chat specs)")
    return {"chat_template_kwargs": [{**(shared or {}), **(s.chat_template_kwargs or {})} for s in specs]}


def add_ensemble_options(parser: argparse.ArgumentParser) -> None:
    """Options of the ensemble itself."""
    parser.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per model")
    parser.add_argument(
        "--max-pass-tokens",
        type=int,
        default=DEFAULT_MAX_PASS_TOKENS,
        help="most tokens (rows x positions) a model reads in one forward pass; longer prompts take "
        f"several passes (default {DEFAULT_MAX_PASS_TOKENS})",
    )
    add_step_options(parser)


def add_step_options(parser: argparse.ArgumentParser) -> None:
    """How the ensemble picks and follows tokens: ``--k`` and ``--sync``."""
    parser.add_argument(
        "--k", type=int, default=DEFAULT_K, help=f"top-k tokens each model proposes (default {DEFAULT_K})"
    )
    parser.add_argument(
        "--sync",
        choices=("exact", "fast"),
        default=DEFAULT_SYNC,
        help=f"how models follow the text (default {DEFAULT_SYNC})",
    )


def add_task_options(parser: argparse.ArgumentParser) -> None:
    from unite_ext.tasks import TASKS

    parser.add_argument("--task", required=True, choices=list(TASKS), help="benchmark (see docs/tasks.md)")
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="questions: .jsonl, .json or .parquet file (MMLU/CMMLU: a split folder; MMLU: also a file; "
        "CMMLU: also a folder of subject folders)",
    )
    parser.add_argument("--fewshot", type=Path, default=None, help="solved examples (default: the task's)")
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="evaluate only N questions: the first ones (MMLU/CMMLU: each subject's first, in turn)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's budget")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def load_examples(args: argparse.Namespace) -> tuple[Any, list[Any]]:
    """The task and its (limited) examples."""
    from unite_ext.tasks import get_task

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    task = get_task(args.task)
    examples = task.load(args.data, args.fewshot)
    return task, task.first(examples, args.limit) if args.limit is not None else examples


def run_eval(args: argparse.Namespace) -> int:
    from unite_ext.tasks.evaluation import (
        ensemble_generator,
        evaluate,
        format_categories,
        format_summary,
        lazy_generator,
    )

    specs = model_specs(
        args.model, args.weights, dtype=args.dtype, device_map=args.device_map, chat=args.chat
    )
    task, examples = load_examples(args)
    run = {
        "task": task.name,
        "models": [s.as_dict() for s in specs],
        "k": args.k,
        "sync": args.sync,
        "max_new_tokens": args.max_new_tokens or task.max_new_tokens,
    }
    chat = uses_chat(specs)
    template = chat_template_kwargs(args, specs, chat)
    run.update(template)
    result = evaluate(
        task,
        examples,
        lazy_generator(
            lambda: ensemble_generator(
                build_ensemble(specs, k=args.k, sync=args.sync, max_pass_tokens=args.max_pass_tokens),
                chat=chat,
                **template,
            )
        ),
        args.out,
        run=run,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress,
    )
    print(format_summary([result]))
    categories = format_categories(result)
    if categories:
        print(f"\n{categories}")
    return 0


def run_select(args: argparse.Namespace) -> int:
    from unite_ext.selection import apply_selection_rule, evaluate_candidates, format_decisions
    from unite_ext.tasks.evaluation import GenerateFn, ensemble_generator, lazy_generator

    candidates = model_specs(args.candidates, dtype=args.dtype, device_map=args.device_map, chat=args.chat)
    if len({c.path for c in candidates}) != len(candidates):
        raise ValueError("--candidates lists a model twice")
    task, examples = load_examples(args)

    chat = uses_chat(candidates)

    def generator_for(spec: ModelSpec) -> GenerateFn:
        template = chat_template_kwargs(args, [spec], chat)
        return lazy_generator(lambda: ensemble_generator(build_ensemble([spec]), chat=chat, **template))

    stats = evaluate_candidates(
        task,
        examples,
        candidates,
        generator_for,
        work_dir=args.work_dir,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress,
    )
    rule = {
        "max_accuracy_gap": args.max_accuracy_gap,
        "gap": args.gap,
        "max_length_ratio": args.max_length_ratio,
        "max_models": args.max_models,
    }
    decisions = apply_selection_rule(stats, **rule)
    print(format_decisions(stats, decisions))
    chosen = [spec for spec, decision in zip(candidates, decisions, strict=True) if decision.chosen]
    selection = {
        "task": task.name,
        "data": str(args.data),
        "examples": len(examples),
        "rule": rule,
        "candidates": [
            {
                "model": s.model,
                "accuracy": s.accuracy,
                "mean_length": s.mean_length,
                "chosen": d.chosen,
                "reason": d.reason,
            }
            for s, d in zip(stats, decisions, strict=True)
        ],
    }
    write_spec(args.out, chosen, selection)
    print(f"chosen: {', '.join(s.path for s in chosen)} -> {args.out}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    specs = model_specs(
        args.model, args.weights, dtype=args.dtype, device_map=args.device_map, chat=args.chat
    )
    if args.messages is not None:
        conversation = json.loads(Path(args.messages).read_text(encoding="utf-8"))
        if not isinstance(conversation, list) or not all(isinstance(m, dict) for m in conversation):
            raise ValueError(
                f"--messages {args.messages}: expected a JSON list of {{'role', 'content'}} objects"
            )
        inputs: dict[str, Any] = {"messages": [conversation]}
    elif uses_chat(specs):
        inputs = {"messages": [[{"role": "user", "content": args.prompt}]]}
    else:
        inputs = {"prompts": [args.prompt]}
    inputs.update(chat_template_kwargs(args, specs, "messages" in inputs))
    ensemble = build_ensemble(specs, k=args.k, sync=args.sync, max_pass_tokens=args.max_pass_tokens)

    def stream(row: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    ensemble.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        stop=args.stop,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0,
        top_p=args.top_p,
        seed=args.seed,
        stream=stream,
        progress=False,
    )
    sys.stdout.write("\n")
    return 0


def run_bench(argv: list[str]) -> int:
    from unite_ext.benchmark import main as bench_main

    return bench_main(argv)


def run_demo(argv: list[str]) -> int:
    from unite_ext.demo import main as demo_main

    return demo_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unite", description="UNITE ensembling of LLMs with different tokenizers"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("eval", help="evaluate an ensemble (or one model) on a benchmark")
    evaluate.add_argument(
        "--model",
        action="append",
        required=True,
        help="model folder or hub name, or a spec file (.json/.yaml); repeat for an ensemble",
    )
    add_ensemble_options(evaluate)
    add_model_options(evaluate)
    add_task_options(evaluate)
    evaluate.add_argument("--out", required=True, type=Path, help="JSON Lines results (resumed if it exists)")
    evaluate.set_defaults(handler=run_eval)

    select = commands.add_parser("select", help="choose compatible models from how each does alone")
    select.add_argument(
        "--candidates", nargs="+", required=True, help="models (or spec files) to choose from"
    )
    add_model_options(select)
    add_task_options(select)
    select.add_argument(
        "--max-accuracy-gap",
        type=float,
        default=0.10,
        help="how far below the base's accuracy (default 0.10)",
    )
    select.add_argument(
        "--gap",
        choices=("relative", "absolute"),
        default="relative",
        help="relative: a fraction of the base's accuracy (default); absolute: accuracy points",
    )
    select.add_argument(
        "--max-length-ratio", type=float, default=2.0, help="longer/shorter mean response length (default 2)"
    )
    select.add_argument(
        "--max-models", type=int, default=None, help="choose at most N models (default: no limit)"
    )
    select.add_argument(
        "--work-dir", type=Path, default=None, help="keep each candidate's records here (resumable)"
    )
    select.add_argument("--out", required=True, type=Path, help="JSON spec file of the chosen models")
    select.set_defaults(handler=run_select)

    generate = commands.add_parser("generate", help="generate one text, streamed to stdout")
    generate.add_argument("--model", action="append", required=True, help="model or spec file; repeat")
    add_ensemble_options(generate)
    add_model_options(generate)
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument(
        "--messages",
        type=Path,
        help="JSON file: a list of {role, content} messages (a last assistant message is continued)",
    )
    generate.add_argument("--max-new-tokens", type=int, default=256, help="default 256")
    generate.add_argument("--stop", nargs="+", default=None, help="strings that end the text")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus size when sampling (default 1)")
    generate.add_argument("--seed", type=int, default=None, help="sampling seed")
    generate.set_defaults(handler=run_generate)

    commands.add_parser("bench", help="ensemble-step micro-benchmark (unite bench --help)", add_help=False)
    commands.add_parser(
        "demo",
        help="two tiny models, each knowing part of the facts, alone and ensembled (unite demo --help)",
        add_help=False,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``unite`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its options belong to the benchmark module
        return run_bench(argv[1:])
    if argv[:1] == ["demo"]:  # likewise the demo module's
        return run_demo(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"unite {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
