"""Chat formatting, the bottom layer every stage shares: what a model is sent and how a
conversation becomes token ids.

Two kinds of templates meet here:

- **Prompt templates** a user writes (a task's ``prompt_template``, the elicitation methods',
  judge's and reward's templates): Jinja2 text inline in the config, or ``@path/to/file.j2``
  (relative to the working directory). All render in one sandboxed environment
  (:data:`SANDBOX`): a template from a config file shared by someone else can read the
  variables it is given and nothing else; it cannot reach Python internals
  (``cycler.__init__.__globals__``) or change a value. An unknown variable is an error that
  names the template's key, never a silently empty prompt.
- **Chat templates** a tokenizer ships: they turn ``[{"role", "content"}...]`` into the text a
  model reads. :func:`tokenize_messages` renders them turn by turn so that only assistant tokens
  are trained on.

:func:`task_messages` is the one place a task problem becomes the messages a model is sent;
:func:`distillery.tasks.load_problems` stores them as ``Problem.messages``, which generation
seeds, ground-truth training records (and so capture, which reads records) and evaluation all
send, so a student is trained on exactly the turns it is evaluated with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from distillery.errors import DistilleryError

if TYPE_CHECKING:  # annotations only: importing transformers takes seconds, and only its
    from transformers import PreTrainedTokenizerBase  # tokenizers' own methods are called

IGNORE = -100  # label of a position that does not count in the loss

Span = tuple[int, int]
NO_SPAN: Span = (-1, -1)  # a template or special token: no characters of a turn's content


# --------------------------------------------------------------------------- prompt templates


class TemplateError(DistilleryError, ValueError):
    """A user template that cannot be read or rendered (or that the sandbox refused), naming
    its config key and why."""


# Immutable: a template cannot append to a list or set a key of a value it is given.
# StrictUndefined: a misspelt variable fails instead of rendering as "".
SANDBOX = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined,
                                        keep_trailing_newline=False, autoescape=False)


def builtin(name: str) -> str:
    """The text of a template shipped with distillery (``elicit/templates/<name>.j2``).

    Read as package data, so the layers that use one (elicit, evaluate's judge, train's
    reward) do not import each other for it.
    """
    return resources.files("distillery").joinpath("elicit", "templates", f"{name}.j2").read_text()


@lru_cache(maxsize=128)
def _compile(source: str, label: str) -> jinja2.Template:
    if source.startswith("@"):
        path = Path(source[1:])
        if not path.is_file():
            raise TemplateError(f"{label}: template file not found: {path} (a path after '@' is "
                                "relative to the working directory)")
        source = path.read_text(encoding="utf-8")
    try:
        return SANDBOX.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{label}: template line {exc.lineno}: {exc.message}") from None


def render(source: str, label: str = "template", **variables: object) -> str:
    """Render ``source`` (template text or ``@file``) with ``variables`` in the sandbox.

    ``label`` is the config key the template came from; every error starts with it. Surrounding
    whitespace is stripped (a template file's final newline is not part of the prompt).
    """
    try:
        return _compile(source, label).render(**variables).strip()
    except SecurityError as exc:
        raise TemplateError(f"{label}: refused by the template sandbox ({exc}); a template may "
                            "only read the variables it is given") from None
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"{label}: {exc.message}; available variables: "
                            f"{', '.join(sorted(variables))}") from None


class TaskItem(Protocol):
    """What :func:`task_messages` reads of a task problem (:class:`distillery.tasks.Problem`)."""

    id: str
    prompt: str
    extra: dict[str, Any]


class TaskPrompt(Protocol):
    """What :func:`task_messages` reads of a task config (:class:`distillery.config.TaskConfig`;
    a protocol, so this module imports no config and the graders below config can use it)."""

    prompt_template: str | None
    system_prompt: str | None


def task_messages(task: TaskPrompt, problem: TaskItem) -> list[dict[str, str]]:
    """The turns a model is sent for one task problem: ``[system?, user]``.

    Without ``task.prompt_template`` the user turn is the bare ``problem.prompt``; with it, the
    template rendered with ``prompt``, ``id`` and every key of ``problem.extra`` (a JSONL task
    line's other keys; never ``reference`` or ``chain``, which are the answer).
    ``task.system_prompt`` adds a system turn first.
    """
    user = problem.prompt
    if task.prompt_template is not None:
        user = render(task.prompt_template, "task.prompt_template",
                      **{**problem.extra, "id": problem.id, "prompt": problem.prompt})
    system = [{"role": "system", "content": task.system_prompt}] if task.system_prompt else []
    return [*system, {"role": "user", "content": user}]


# --------------------------------------------------------------------------- chat templates


class ChatTemplateError(DistilleryError, ValueError):
    """The tokenizer's chat template does not render conversations as a growing prefix, or
    does not keep an assistant turn's content verbatim."""


def chat_pieces(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, int, bool]]:
    """The pieces of text the chat template adds turn by turn: ``(text, message index, train)``.

    An assistant turn gives two pieces: its generation prompt (not trained) and then its content
    with whatever the template closes the turn with (trained). Concatenated, the pieces are the
    rendered conversation; each is tokenized on its own by :func:`tokenize_messages`.
    """
    pieces: list[tuple[str, int, bool]] = []
    prev = ""

    def add(text: str, index: int, train: bool) -> None:
        nonlocal prev
        if not text.startswith(prev):
            raise ChatTemplateError(
                "the chat template does not render conversations as a growing prefix; "
                "tokenize with a template that does, or pre-render records as plain text"
            )
        pieces.append((text[len(prev) :], index, train))
        prev = text

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            add(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True), i, False)
        add(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False), i, message["role"] == "assistant")
    return pieces


def tokenize_messages(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, max_len: int
) -> dict[str, list[int]]:
    """Token ids of a conversation and labels that keep only the assistant turns' tokens.

    The chat template is rendered turn by turn; each new piece of text is tokenized on its own
    and labeled if it belongs to an assistant turn (its content and end token). This works for
    any template that renders conversations as a growing prefix, which all common ones do.
    Sequences longer than ``max_len`` are cut from the right.
    """
    ids: list[int] = []
    labels: list[int] = []
    for text, _, train in chat_pieces(messages, tokenizer):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if train else [IGNORE] * len(piece))
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}


def prompt_text(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> str:
    """The text a model is given to continue: every turn but the last assistant one, plus the tag."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class ChatTokens:
    """One tokenizer's view of a conversation, as :func:`tokenize_messages` makes it, plus where
    each token stands in its turn's content.

    ``ids`` / ``labels`` / ``offsets``: ``[seq]`` each (not cut to a length); ``offsets[t]`` is
    the token's ``(start, end)`` relative to its assistant turn's content, :data:`NO_SPAN` for
    template and special tokens. ``turns[i]``: the (prefix, content, suffix) token indices of
    assistant message ``i``.
    """

    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    offsets: list[Span] = field(default_factory=list)
    turns: dict[int, tuple[list[int], list[int], list[int]]] = field(default_factory=dict)


def _content_start(piece: str, content: str, index: int, tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """Where the turn's content stands in its assistant piece: (start, length)."""
    for text in (content, content.strip()):
        at = piece.find(text)
        if at >= 0:
            return at, len(text)
    raise ChatTemplateError(
        f"message {index}: the chat template of {tokenizer.name_or_path or type(tokenizer).__name__} "
        f"does not render the assistant content as written (its piece is {piece[:80]!r}); "
        "cross-tokenizer alignment needs a template that keeps the content verbatim"
    )


def tokenize_with_offsets(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> ChatTokens:
    """Token ids and labels as :func:`tokenize_messages` makes them (uncut), plus per-token
    offsets relative to each assistant turn's content and each turn's prefix/content/suffix
    tokens (what cross-tokenizer alignment and a logit cache's ``offsets`` need)."""
    side = ChatTokens()
    for text, index, train in chat_pieces(messages, tokenizer):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        base = len(side.ids)
        side.ids.extend(enc["input_ids"])
        side.labels.extend(enc["input_ids"] if train else [IGNORE] * len(enc["input_ids"]))
        if not train:
            side.offsets.extend([NO_SPAN] * len(enc["input_ids"]))
            continue
        at, n = _content_start(text, messages[index]["content"], index, tokenizer)
        parts: tuple[list[int], list[int], list[int]] = ([], [], [])
        for k, (s, e) in enumerate(enc["offset_mapping"]):
            where = 0 if e <= at and s < at else 2 if s >= at + n else 1
            parts[where].append(base + k)
            side.offsets.append((max(s, at) - at, min(e, at + n) - at) if where == 1 else NO_SPAN)
        side.turns[index] = parts
    return side


def content_offsets(messages: list[dict], tokenizer: PreTrainedTokenizerBase, max_len: int) -> list[Span]:
    """Per token of :func:`tokenize_messages`' sequence ``[seq]``: its ``(start, end)`` in its
    assistant turn's content, ``(-1, -1)`` for template and special tokens. What a logit cache
    captured for a student with another tokenizer stores (``capture.offsets``)."""
    return tokenize_with_offsets(messages, tokenizer).offsets[:max_len]
