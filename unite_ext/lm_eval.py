"""lm-evaluation-harness backend: :class:`UniteLM`, registered as model ``"unite"``.

Usage::

    import lm_eval
    import unite_ext.lm_eval  # registers "unite"

    lm_eval.simple_evaluate(
        model="unite",
        model_args="models=/models/llama3;/models/qwen2,weights=0.5;0.5,k=10,batch_size=8",
        tasks=["arc_challenge"],
    )

or ``simple_evaluate(model=UniteLM(spec="chosen.json"))``. Model arguments: ``models`` (paths or hub
names separated by ``;``, or a list), or ``spec`` (a model spec file, see :mod:`unite_ext.model_spec`);
``weights`` (``;``-separated or a list), ``k``, ``sync``, ``dtype``, ``device_map``, ``batch_size``,
``max_pass_tokens``, ``max_gen_toks``, ``max_length``, ``greedy_check``, ``enable_thinking``,
``think_end_token`` (and, from Python, ``chat_template_args``); see :class:`UniteLM`. The package also
declares the entry point ``unite = "unite_ext.lm_eval:UniteLM"`` in the group ``lm_eval.models``.

How requests are answered:

- ``generate_until``: the ensemble's own decoding (``Ensemble.generate``), greedy unless the task asks
  for sampling; the text stops before the first ``until`` string. A context that leaves a model fewer
  than ``max_gen_toks`` positions of its maximum length is cut from the left (at a character, keeping the
  longest end that fits every model), as the harness's Hugging Face backend cuts its tokens, with a warning.
- ``loglikelihood``: every model scores the continuation under its own tokenization, ``ll_i = log
  p_i(continuation | context)``: the context is encoded as a prompt (with the model's special tokens, as
  ``Ensemble.generate`` encodes prompts) and the continuation is the model's mid-text encoding of its
  bytes, the tokens the decoding loop itself would hold. Trailing whitespace of the context is moved to
  the continuation first (as the harness's own Hugging Face backend does). The ensemble's value is the
  log of the weighted average of the models' probabilities of the continuation,
  ``log sum_i w_i exp(ll_i)`` with the ensemble's normalised weights, computed with log-sum-exp.
  ``is_greedy`` says whether the ensemble's greedy generation from the context starts with the
  continuation (one generation per context, which ends as soon as its text has decided each of the
  context's continuations; ``greedy_check=False`` skips it and reports False). Requests with the same
  context (a multiple-choice question's choices) read it once, and the contexts of a batch read their
  common prefix (a few-shot prompt) once (``UniteLM.score_tokens``).
- ``loglikelihood_rolling``: each model's log-likelihood of the whole text (in windows of its maximum
  length, after its BOS, or EOS when it has no BOS), combined the same way.

Chat templates (the harness's ``apply_chat_template=True``, with ``fewshot_as_multiturn`` or without):
each model renders the conversation with its own template (its tokenizer's, or the spec's file, with the
spec's ``chat_template_kwargs`` over the ``chat_template_args`` and ``enable_thinking`` arguments), as
``Ensemble.generate`` renders ``messages``: the generation prompt, or, after the harness's assistant prefix
(``gen_prefix``), the open assistant message. The harness renders a conversation to one string, so the
string a request carries is the conversation itself (``CHAT_MARKER`` and its messages as JSON). A
conversation that some model's template refuses (Gemma 2's and Mistral's refuse system messages) goes to
every model without its system messages, with a warning, as the harness's Hugging Face backend does for one
model. A chat context too long for a model's maximum length is an error (a conversation is not cut). A spec
file with ``chat_template`` set needs the harness's ``apply_chat_template=True``: plain prompts are refused.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import jinja2
import torch
from tqdm.auto import tqdm

from unite_ext.defaults import DEFAULT_K, DEFAULT_MAX_PASS_TOKENS, DEFAULT_SYNC

try:
    from lm_eval import utils as lm_eval_utils
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as error:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError(
        "unite_ext.lm_eval needs lm-evaluation-harness: pip install lm_eval (or unite_ext[lm_eval])"
    ) from error

from unite_ext.decode import _ModelBatch, _new_batch, _start_groups, context_length, render_chat
from unite_ext.model_spec import ModelSpec, build_ensemble, load_spec, uses_chat

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # for models whose config states no context length
# Opens a request's context that holds a conversation (its messages as JSON) rather than text.
CHAT_MARKER = "\x1eunite-chat\x1e"


def split_list(value: str | Sequence[Any] | None) -> list[Any] | None:
    """A ``;``-separated model argument as a list (lists and ``None`` pass through)."""
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else list(value)
    return [part.strip() for part in str(value).split(";") if part.strip()]


def move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """The context's trailing whitespace moved to the continuation (" Paris" reads better than "Answer: "
    + "Paris"), as the harness's Hugging Face backend does."""
    spaces = len(context) - len(context.rstrip())
    return (context[:-spaces], context[-spaces:] + continuation) if spaces else (context, continuation)


def combine_loglikelihoods(per_model: Sequence[float], weights: Sequence[float]) -> float:
    """``log sum_i w_i exp(ll_i)``: the log of the weighted average of the models' probabilities."""
    terms = [math.log(w) + ll for ll, w in zip(per_model, weights, strict=True) if w > 0]
    top = max(terms)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(t - top) for t in terms))


# The log-softmax normaliser (log-sum-exp) is taken over boxes of at most this many logits (positions x
# vocabulary) at a time, in float32: a pass's logits are not copied whole (16384 positions of a 152k
# vocabulary are 10 GB in float32).
LOGSUMEXP_CHUNK_ELEMENTS = 1 << 24


def _log_likelihoods(
    run: _ModelBatch, feeds: list[list[int]], rows: list[int], targets: list[list[int]]
) -> list[float]:
    """Read `feeds` with `run` (``_ModelBatch.read``); returns, for each `i`, the summed log-probability
    of `targets[i]` under the logits after the last ``len(targets[i])`` tokens of row `rows[i]`."""
    keep = max(map(len, targets))
    # Each target under the last `keep` columns of the right-aligned rows (-1: none).
    wanted = torch.tensor([[-1] * (keep - len(t)) + t for t in targets])
    which = torch.tensor(rows)
    totals = torch.zeros(len(targets), dtype=torch.float64)
    for first, logits in run.read(feeds, keep):
        batch, columns, vocabulary = logits.shape
        # Boxes of whole rows when a row fits in one, else of pieces of a row: views, not copies.
        positions = max(1, LOGSUMEXP_CHUNK_ELEMENTS // vocabulary)
        box_rows, box_columns = max(1, positions // columns), min(columns, positions)
        normaliser = torch.empty(batch, columns, device=logits.device)
        for row in range(0, batch, box_rows):
            for column in range(0, columns, box_columns):
                box = (slice(row, row + box_rows), slice(column, column + box_columns))
                normaliser[box] = logits[box].float().logsumexp(-1)
        picked = wanted[:, first : first + columns]
        of_target, of_column = (picked >= 0).nonzero(as_tuple=True)
        # Target, row, column and token of every scored position, moved to the logits' device at once.
        scored = torch.stack([of_target, which[of_target], of_column, picked[of_target, of_column]])
        target, row, column, token = scored.to(logits.device)
        scores = logits[row, column, token].float() - normaliser[row, column]
        pass_totals = torch.zeros(len(targets), dtype=torch.float64, device=logits.device)
        totals += pass_totals.index_add_(0, target, scores.double()).cpu()
    return totals.tolist()


@register_model("unite")
class UniteLM(LM):
    """UNITE ensemble (or one model) as an lm-evaluation-harness model.

    Args:
        models: model folders or hub names (``;``-separated string or list).
        spec: a model spec file instead of ``models`` (per-model dtype, device map and weight).
        weights: one weight per model (``;``-separated or list); default uniform, or the spec's.
        k: top-k tokens each model proposes per step (default 10).
        sync: ``"exact"`` (default) or ``"fast"``, as for ``Ensemble``.
        dtype: dtype of models given by ``models`` (default ``"auto"``).
        device_map: ``from_pretrained`` device map of models given by ``models``; default ``device``.
        device: the harness's ``--device``, used as ``device_map`` when that is not given.
        max_batch_size: accepted for the harness's sake and unused (batch sizes are fixed).
        batch_size: rows per forward pass or generation batch (default 8).
        max_pass_tokens: the most tokens (rows x positions) a model reads in one forward pass, scoring or
            generating (default 16384, ``unite_ext.defaults.DEFAULT_MAX_PASS_TOKENS``); a scoring pass also
            holds the logits of its positions (tokens x vocabulary), so lower it when those do not fit.
        max_gen_toks: generation budget when a task gives none (default 256).
        max_length: most tokens a model reads at once (default: each model's configured context length,
            else 2048).
        greedy_check: compute ``is_greedy`` for ``loglikelihood`` (default true).
        chat_template_args: variables of every model's chat template, under a spec's own
            ``chat_template_kwargs``; used with the harness's ``apply_chat_template`` (names as in the
            harness's Hugging Face backend).
        enable_thinking: sets the template variable ``enable_thinking`` (Qwen3's) when given; true needs
            ``think_end_token``.
        think_end_token: the text that ends a reasoning section (e.g. ``"</think>"``): a generation keeps
            only what follows its last one, left-stripped, as in the harness's Hugging Face backend.
        ensemble: an already built ``unite_ext.decode.Ensemble`` instead of ``models``/``spec``.
    """

    def __init__(
        self,
        models: str | Sequence[str] | None = None,
        spec: str | None = None,
        weights: str | Sequence[float] | None = None,
        k: int = DEFAULT_K,
        sync: str = DEFAULT_SYNC,
        dtype: str = "auto",
        device_map: str | None = None,
        device: str | None = None,
        batch_size: int | str = 8,
        max_batch_size: int | None = None,
        max_pass_tokens: int | str | None = None,
        max_gen_toks: int = 256,
        max_length: int | None = None,
        greedy_check: bool = True,
        chat_template_args: dict[str, Any] | None = None,
        enable_thinking: bool | None = None,
        think_end_token: str | None = None,
        ensemble: Any = None,
    ) -> None:
        super().__init__()
        sources = [models is not None, spec is not None, ensemble is not None]
        if sum(sources) != 1:
            raise ValueError("give exactly one of models=..., spec=... or ensemble=...")
        if ensemble is None:
            if spec is not None:
                specs = load_spec(spec)
            else:
                specs = [
                    ModelSpec(p, dtype=dtype, device_map=device_map or device) for p in split_list(models)
                ]
            weight_list = split_list(weights)
            if weight_list is not None:
                if len(weight_list) != len(specs):
                    raise ValueError(f"weights gives {len(weight_list)} numbers for {len(specs)} models")
                specs = [
                    dataclasses.replace(s, weight=float(w)) for s, w in zip(specs, weight_list, strict=True)
                ]
            self.chat_required = uses_chat(specs)
            own_kwargs = [spec.chat_template_kwargs or {} for spec in specs]
            ensemble = build_ensemble(
                specs,
                k=int(k),
                sync=sync,
                max_pass_tokens=DEFAULT_MAX_PASS_TOKENS if max_pass_tokens is None else int(max_pass_tokens),
            )
        else:
            for name, value in (("weights", weights), ("max_pass_tokens", max_pass_tokens)):
                if value is not None:
                    raise ValueError(
                        f"{name}=... cannot be combined with ensemble=...; set it on the Ensemble"
                    )
            self.chat_required = False
            own_kwargs = [{} for _ in ensemble.members]
        if chat_template_args is not None and not isinstance(chat_template_args, dict):
            raise TypeError(f"chat_template_args must be a dict, got {type(chat_template_args).__name__}")
        shared = dict(chat_template_args or {})
        if enable_thinking is not None:
            shared["enable_thinking"] = bool(enable_thinking)
        if think_end_token is not None and (
            not isinstance(think_end_token, str) or think_end_token.isdigit()
        ):
            raise ValueError(f"think_end_token must be the token's text, got {think_end_token!r}")
        if enable_thinking and not think_end_token:
            raise ValueError("enable_thinking=True needs think_end_token (e.g. think_end_token=</think>)")
        self.think_end_token = think_end_token
        # Each model's template variables: the shared ones, under its spec's own.
        self.template_kwargs = [{**shared, **own} for own in own_kwargs]
        self.warned_system_refusal = False
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise ValueError(f"batch_size must be a number, got {batch_size!r} ('auto' is not supported)")
        self.ensemble = ensemble
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        self.max_gen_toks = int(max_gen_toks)
        self.max_length_override = None if max_length is None else int(max_length)
        self.greedy_check = bool(greedy_check)

    # ------------------------------------------------------------------ helpers

    @property
    def members(self) -> list[Any]:
        return self.ensemble.members

    def model_max_length(self, member: Any) -> int:
        if self.max_length_override is not None:
            return self.max_length_override
        return context_length(member.model.config.get_text_config()) or DEFAULT_MAX_LENGTH

    @staticmethod
    def prefix_token(member: Any) -> int:
        """The token a text starts after: BOS, or EOS for tokenizers without one."""
        tokenizer = member.tokenizer
        return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else member.eos_token_ids[0]

    def encode_pair(
        self, index: int, context: str, continuation: str, add_special_tokens: bool = True
    ) -> tuple[list[int], list[int]]:
        """Model ``index``'s (context tokens, continuation tokens); see the module documentation. A rendered
        chat context carries its special tokens already (``add_special_tokens=False``)."""
        member = self.members[index]
        if context:
            context_ids = list(member.tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"])
            continuation_ids = self.ensemble.tables.encode_mid_text(index, continuation.encode("utf-8"))
            return context_ids, continuation_ids
        ids = list(member.tokenizer(continuation)["input_ids"])
        prefix = self.prefix_token(member)
        return ([prefix], ids) if not ids or ids[0] != prefix else ([prefix], ids[1:])

    @torch.inference_mode()
    def score_tokens(
        self, index: int, pairs: Sequence[tuple[list[int], list[int]]], progress: bool = True
    ) -> list[float]:
        """Model ``index``'s summed log-probability of each continuation given its context.

        Contexts are cut from the left to fit the model's maximum length. Requests with the same context
        (a multiple-choice question's choices) read it once, as one row: its last logits score each
        continuation's first token, and then each continuation of more tokens reads the rest in a row of
        its own, from a copy of that row's cache (masked slots pad the copies' tails on the left). A model
        that must read a row's tokens without masked slots between them (``reads_rows_alone``: recurrent
        layers, slot-distance biases) reads each request's tokens in one row instead (requests reading
        the same tokens still share it). Rows that start with the same
        ``unite_ext.decode.PREFIX_GROUP_TOKENS`` tokens (a few-shot prompt's) are batched together, and a
        batch reads its rows' common prefix once where that pays (``unite_ext.decode._new_batch``). Rows
        are left-padded and batched by the longest request they serve, ``batch_size`` rows at a time,
        with at most as many tails (a context with more is read again for the others), or fewer where more
        would exceed the ensemble's ``max_pass_tokens``; a longer one is read alone in passes of that many
        tokens (``_ModelBatch.read``), so no row read in one piece has padding after its first token. One
        pass's activations and logits (``max_pass_tokens`` x vocabulary) bound the memory, and a batch's
        cache copies hold about that many tokens.
        """
        member = self.members[index]
        limit = self.model_max_length(member)
        budget = self.ensemble.max_pass_tokens
        shares = not member.reads_rows_alone
        readers: dict[tuple[int, ...], list[int]] = {}  # the tokens a row reads first -> the requests
        tails = []  # each request's continuation tokens read after its row's, in a row of its own
        for request, (context, continuation) in enumerate(pairs):
            if not continuation:
                raise ValueError("an empty continuation has no likelihood to compute")
            if len(continuation) > limit:
                raise ValueError(
                    f"continuation of {len(continuation)} tokens exceeds {member.name}'s {limit}"
                )
            read = (context + continuation)[-(limit + 1) : -1]  # the last token is only predicted
            split = len(read) - (len(continuation) - 1 if shares else 0)
            readers.setdefault(tuple(read[:split]), []).append(request)
            tails.append(read[split:])
        # The longest a request of each row reads (row and tail), and so how many rows, or tails, a batch
        # of such rows holds (at least one).
        width = {tokens: len(tokens) + max(len(tails[r]) for r in rs) for tokens, rs in readers.items()}

        def room(tokens: tuple[int, ...]) -> int:
            return max(1, min(self.batch_size, budget // width[tokens]))

        # Rows that start alike (a few-shot prompt) are batched together (a batch does not mix groups), so
        # that a batch reads their common prefix once; each group, and the rows that start like no other,
        # widest first.
        group = _start_groups(readers)

        # Each row to read, with the requests it scores: a row with more tails than a batch holds is read
        # again for the others.
        chunks: list[tuple[tuple[int, ...], list[int]]] = []
        for tokens in sorted(readers, key=lambda tokens: (group(tokens), -width[tokens])):
            tailed, most = [r for r in readers[tokens] if tails[r]], room(tokens)
            pieces = [tailed[i : i + most] for i in range(0, len(tailed), most)] or [[]]
            pieces[0] = [r for r in readers[tokens] if not tails[r]] + pieces[0]
            chunks.extend((tokens, piece) for piece in pieces)
        results = [0.0] * len(pairs)
        order = collections.deque(chunks)
        with tqdm(total=len(pairs), desc=f"scoring with {member.name}", disable=not progress) as bar:
            while order:
                most = room(order[0][0])  # the first row is the widest of its group
                batch: list[tuple[tuple[int, ...], list[int]]] = []
                tailed, first = 0, group(order[0][0])
                while order and len(batch) < most and group(order[0][0]) == first:
                    more = sum(1 for r in order[0][1] if tails[r])
                    if batch and tailed + more > most:
                        break
                    batch.append(order.popleft())
                    tailed += more
                run, feeds = _new_batch(member, [list(tokens) for tokens, _ in batch], None, budget)
                firsts = [(r, row) for row, (_, requests) in enumerate(batch) for r in requests]
                targets = [pairs[r][1][: len(pairs[r][1]) - len(tails[r])] for r, _ in firsts]
                scores = _log_likelihoods(run, feeds, [row for _, row in firsts], targets)
                for (r, _), score in zip(firsts, scores, strict=True):
                    results[r] = score
                followers = [(r, row) for r, row in firsts if tails[r]]
                if followers:
                    run.keep_rows([row for _, row in followers])
                    feeds = [tails[r] for r, _ in followers]
                    targets = [pairs[r][1][-len(tails[r]) :] for r, _ in followers]
                    scores = _log_likelihoods(run, feeds, list(range(len(followers))), targets)
                    for (r, _), score in zip(followers, scores, strict=True):
                        results[r] += score
                bar.update(len(firsts))
        return results

    def ensemble_loglikelihoods(
        self, pairs_per_model: list[list[tuple[list[int], list[int]]]], progress: bool = True
    ) -> list[float]:
        """Combine every model's scores of the same requests (module documentation)."""
        per_model = [self.score_tokens(i, pairs, progress) for i, pairs in enumerate(pairs_per_model)]
        return [
            combine_loglikelihoods(values, self.ensemble.weights) for values in zip(*per_model, strict=True)
        ]

    # ------------------------------------------------------------------ chat templates

    def conversation(self, context: str) -> list[dict[str, Any]] | None:
        """The conversation a request's context holds (``apply_chat_template``), or None for plain text."""
        if not context.startswith(CHAT_MARKER):
            if self.chat_required:
                raise ValueError(
                    "the spec renders prompts with chat templates (chat_template): run the harness with "
                    "apply_chat_template=True"
                )
            return None
        try:
            return json.loads(context[len(CHAT_MARKER) :])
        except json.JSONDecodeError as error:
            raise ValueError(
                "a chat context was changed after apply_chat_template made it (it must stay a whole "
                f"conversation, for each model to render): {context[:200]!r}"
            ) from error

    def model_context(self, index: int, context: str) -> tuple[str, bool]:
        """Model ``index``'s text of a request's context, and whether it is a rendered conversation."""
        messages = self.conversation(context)
        if messages is None:
            return context, False
        return render_chat(self.members[index].tokenizer, messages, self.template_kwargs[index]), True

    def template_refusing(self, messages: list[dict[str, Any]]) -> str | None:
        """The first model whose chat template raises an error on the conversation, if any."""
        for index, member in enumerate(self.members):
            try:
                render_chat(member.tokenizer, messages, self.template_kwargs[index])
            except jinja2.TemplateError:
                return member.name
        return None

    # ------------------------------------------------------------------ the LM interface

    @property
    def tokenizer_name(self) -> str:
        """Every model's tokenizer, for the harness's fingerprint of chat-templated requests."""
        return "+".join(member.tokenizer.name_or_path.replace("/", "__") for member in self.members)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """Every model's chat template, for the harness's record of the run."""
        if not chat_template:
            return None
        if isinstance(chat_template, str):
            raise ValueError(
                f"a named chat template ({chat_template!r}) is not supported: each model renders with its "
                "tokenizer's template, or the template file its spec names"
            )
        return "\n\n".join(f"{member.name}: {member.tokenizer.chat_template}" for member in self.members)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation as a request's context, for each model to render with its own template."""
        messages = [dict(message) for message in chat_history]
        continues = bool(messages) and messages[-1].get("role") == "assistant"
        if add_generation_prompt == continues:
            raise ValueError(
                "a conversation either ends with an assistant message to continue (add_generation_prompt="
                f"False) or gets the generation prompt; got add_generation_prompt={add_generation_prompt} "
                f"after a {messages[-1].get('role') if messages else 'missing'!r} message"
            )
        for member in self.members:
            if not member.tokenizer.chat_template:
                raise ValueError(f"{member.name}'s tokenizer has no chat template")
        refusing = self.template_refusing(messages)
        if refusing is not None and any(message.get("role") == "system" for message in messages):
            if not self.warned_system_refusal:
                logger.warning(
                    "unite: %s's chat template refuses the conversation; every model gets it without its "
                    "system messages",
                    refusing,
                )
                self.warned_system_refusal = True
            messages = [message for message in messages if message.get("role") != "system"]
        return CHAT_MARKER + json.dumps(messages, ensure_ascii=False)

    def encode_request(self, index: int, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Model ``index``'s tokens of a loglikelihood request: its text of the context (a conversation
        rendered with its template), trailing whitespace moved to the continuation."""
        text, chat = self.model_context(index, context)
        text, continuation = move_trailing_space(text, continuation)
        return self.encode_pair(index, text, continuation, add_special_tokens=not chat)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [request.args for request in requests]
        encoded = [[self.encode_request(i, c, x) for c, x in pairs] for i in range(len(self.members))]
        values = self.ensemble_loglikelihoods(encoded, progress=not disable_tqdm)
        greedy = self.greedy_flags(pairs) if self.greedy_check else [False] * len(pairs)
        results = list(zip(values, greedy, strict=True))
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def fit_contexts(self, contexts: Sequence[str], rooms: Sequence[int]) -> list[str]:
        """Each context, cut from the left where needed so that every model's encoding of it (as
        ``Ensemble.generate`` encodes prompts) leaves the context's room (new tokens) of its maximum
        length."""

        limits = [(member.tokenizer, self.model_max_length(member)) for member in self.members]

        def fits(text: str, room: int) -> bool:
            return all(
                len(tokenizer(text)["input_ids"]) <= max(1, limit - room) for tokenizer, limit in limits
            )

        fitted = []
        for context, room in zip(contexts, rooms, strict=True):
            if not fits(context, room):
                # Invariant: context[low:] does not fit, context[high:] does (the empty text always does).
                low, high = 0, len(context)
                while high - low > 1:
                    middle = (low + high) // 2
                    low, high = (low, middle) if fits(context[middle:], room) else (middle, high)
                logger.warning(
                    "unite: a context of %d characters was cut to its last %d to leave %d new tokens",
                    len(context),
                    len(context) - high,
                    room,
                )
                context = context[high:]
            fitted.append(context)
        return fitted

    def greedy_flags(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """Whether the ensemble's greedy generation from each context starts with the continuation (a
        plain context without its trailing whitespace, which the continuation takes).

        A context is generated from once for all its continuations (a multiple-choice question's
        choices), and its row ends as soon as its text decides every one of them: the text covers the
        continuation or differs from it (the bytes of an unfinished character wait for the rest). Every
        step adds at least one byte, so as many steps as the longest continuation has bytes (the context's
        room) cover them all.
        """
        pairs = [p if self.conversation(p[0]) is not None else move_trailing_space(*p) for p in pairs]
        targets: dict[str, list[str]] = {}
        for context, continuation in pairs:
            targets.setdefault(context, []).append(continuation)
        contexts = list(targets)
        if any(not c for c in contexts):
            raise ValueError("is_greedy needs a non-empty context; pass greedy_check=False")
        wanted = list(targets.values())

        def decided(row: int, generated: bytes) -> bool:
            text = codecs.getincrementaldecoder("utf-8")("replace").decode(generated)  # complete characters
            return not any(len(text) < len(x) and x.startswith(text) for x in wanted[row])

        rooms = [max(len(x.encode("utf-8")) for x in xs) for xs in wanted]
        texts = self.generate_texts(contexts, rooms, stop_when=decided, progress=False)
        generated = dict(zip(contexts, texts, strict=True))
        return [generated[c].startswith(x) for c, x in pairs]

    def generate_texts(
        self, contexts: Sequence[str], max_new_tokens: int | Sequence[int], **settings: Any
    ) -> list[str]:
        """The ensemble's generations from request contexts: plain texts (cut to fit, ``fit_contexts``) or
        conversations, which each model renders with its template. ``max_new_tokens``: for every context,
        or one per context (each leaves room for its own; the generation takes the most)."""
        rooms = [max_new_tokens] * len(contexts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        conversations = [self.conversation(context) for context in contexts]
        if all(messages is None for messages in conversations):
            inputs: dict[str, Any] = {"prompts": self.fit_contexts(contexts, rooms)}
        elif all(messages is not None for messages in conversations):
            self.check_chat_room(conversations, rooms)
            inputs = {"messages": conversations, "chat_template_kwargs": self.template_kwargs}
        else:
            raise ValueError("a batch of requests mixes plain contexts and conversations")
        generations = self.ensemble.generate(
            **inputs, max_new_tokens=max(rooms), batch_size=self.batch_size, **settings
        )
        return [generation.text for generation in generations]

    def check_chat_room(self, conversations: Sequence[list[dict[str, Any]]], rooms: Sequence[int]) -> None:
        """Every rendered conversation leaves every model its room (new tokens)."""
        for index, member in enumerate(self.members):
            limit = self.model_max_length(member)
            for messages, room in zip(conversations, rooms, strict=True):
                text = render_chat(member.tokenizer, messages, self.template_kwargs[index])
                length = len(member.tokenizer(text, add_special_tokens=False)["input_ids"])
                if length + room > limit:
                    raise ValueError(
                        f"a conversation of {length} tokens leaves {member.name} fewer than {room} "
                        f"of its {limit} positions (a conversation is not cut): use fewer few-shot turns "
                        "or a smaller max_gen_toks"
                    )

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows_per_model: list[list[tuple[list[int], list[int]]]] = []
        owners: list[list[int]] = []
        for index, member in enumerate(self.members):
            windows, owner = [], []
            for r, request in enumerate(requests):
                (text,) = request.args
                _, tokens = self.encode_pair(index, "", text)
                for window in lm_eval_utils.get_rolling_token_windows(
                    token_list=tokens,
                    prefix_token=self.prefix_token(member),
                    max_seq_len=self.model_max_length(member),
                    context_len=1,
                ):
                    windows.append(lm_eval_utils.make_disjoint_window(window))
                    owner.append(r)
            windows_per_model.append(windows)
            owners.append(owner)
        per_model_totals = []
        for index, windows in enumerate(windows_per_model):
            totals = [0.0] * len(requests)
            scores = self.score_tokens(index, windows, progress=not disable_tqdm)
            for r, value in zip(owners[index], scores, strict=True):
                totals[r] += value
            per_model_totals.append(totals)
        results = [
            combine_loglikelihoods(v, self.ensemble.weights) for v in zip(*per_model_totals, strict=True)
        ]
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        results = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        for rows in groups.values():
            settings = dict(requests[rows[0]].args[1])
            until = settings.pop("until", None)
            stop = [until] if isinstance(until, str) else list(until or [])
            max_new_tokens = int(settings.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(settings.pop("temperature", 0.0))
            do_sample = bool(settings.pop("do_sample", False)) and temperature > 0
            top_p = float(settings.pop("top_p", 1.0))
            if settings:
                logger.warning("unite: ignoring generation settings %s", sorted(settings))
            texts = self.generate_texts(
                [requests[i].args[0] for i in rows],
                max_new_tokens,
                stop=stop or None,
                do_sample=do_sample,
                temperature=temperature if do_sample else 1.0,
                top_p=top_p if do_sample else 1.0,
                progress=not disable_tqdm,
            )
            for i, text in zip(rows, texts, strict=True):
                if self.think_end_token:
                    text = text.split(self.think_end_token)[-1].lstrip()
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results
