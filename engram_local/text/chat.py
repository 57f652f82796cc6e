"""Chat rendering: the one place a conversation becomes the text (and tokens) a model reads.

The runtime (a chat turn), the skill adapter's training samples and the memory writer's chat
forms all render through `render_chat`, so the tokens they see agree token for token (rows
fitted on one rendering only fire where the runtime renders the same tokens).
"""

from __future__ import annotations

import json
import time


class ChatTemplateError(ValueError):
    """The model's chat template could not be rendered."""


# Used when a backbone has no chat template of its own.
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
                   "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def render_chat(template: str | None, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True) -> str:
    """The chat template applied to `messages` (jinja2, as transformers renders it)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt):
        return time.strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    try:
        tmpl = env.from_string(template or CHATML_TEMPLATE)
        return tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           bos_token=bos_token, eos_token=eos_token)
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template failed: {exc}") from None

