"""Render a model folder's chat template with a bound on what it may produce.

A chat template is code from the folder: transformers runs it in Jinja's sandbox, which blocks attribute
tricks but not size: `{{ m['content'] * 100000000 }}` renders gigabytes and then crashes the Rust tokenizer.
`render_chat` renders the same template with the same filters, globals and `{% generation %}` tag as
`apply_chat_template`, in a sandbox where `*` / `**` and the output are capped at MAX_EXTRA_CHARS beyond twice
the text it was given; any template failure (syntax, sandbox, `raise_exception`, the cap) is one
ChatTemplateError line.
"""

from __future__ import annotations

import functools
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moechat.errors import MoechatError

MAX_EXTRA_CHARS = 65_536  # what a template may add to its messages' text: ChatML adds ~30 characters a turn
FIX = "fix chat_template.jinja in the model folder, or re-export the model (dvc repro export)"


class ChatTemplateError(MoechatError, ValueError):
    """The folder's chat template cannot render a conversation; one line with the reason and the fix."""


class TemplateTooLarge(jinja2.exceptions.SecurityError):
    """A template expression or the whole output would pass the size cap."""


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox whose `*` and `**` refuse results larger than `limit` (characters, items)."""

    intercepted_binops = frozenset({"*", "**"})
    limit = MAX_EXTRA_CHARS

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "*" and isinstance(right, (str, list, tuple)):
            left, right = right, left
        if op == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int):
            if right > 1 and len(left) * right > self.limit:
                raise TemplateTooLarge(f"`* {right}` would build {len(left) * right:,} items")
            return left * right
        if op == "**" and isinstance(right, int) and isinstance(left, int) and abs(left) > 1 and right > 64:
            raise TemplateTooLarge(f"`{left} ** {right}` is too large")
        return super().call_binop(context, op, left, right)


@functools.lru_cache(maxsize=8)
def bounded_template(source: str) -> jinja2.Template:
    """`source` compiled as transformers compiles chat templates (its filters, globals, extensions), in a
    BoundedEnvironment."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    reference = _compile_jinja_template(source).environment
    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                             extensions=[type(ext) for ext in reference.extensions.values()])
    env.filters.update(reference.filters)
    env.globals.update(reference.globals)
    return env.from_string(source)


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt text of `messages` (what `apply_chat_template(..., tokenize=False)` returns), or a
    ChatTemplateError naming why the template failed or grew past its cap."""
    source = tokenizer.chat_template
    if not isinstance(source, str) or not source:
        raise ChatTemplateError(f"the model folder has no chat template; {FIX}")
    given = sum(len(m["content"]) for m in messages)
    limit = 2 * given + MAX_EXTRA_CHARS
    try:
        template = bounded_template(source)
        template.environment.limit = limit  # type: ignore[attr-defined]
        pieces, size = [], 0
        for piece in template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                       **tokenizer.special_tokens_map):
            size += len(piece)
            if size > limit:
                raise TemplateTooLarge(f"its output passed {limit:,} characters for {given:,} of messages")
            pieces.append(piece)
    except jinja2.TemplateError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ChatTemplateError(f"the model's chat template fails ({type(err).__name__}: {reason}); {FIX}") from None
    return "".join(pieces)

