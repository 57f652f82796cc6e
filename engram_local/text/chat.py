"""Chat rendering: the one place a conversation becomes the text (and tokens) a model reads.

The runtime (a chat turn), the skill adapter's training samples and the memory writer's chat
forms all render through `render_chat` and tokenize through `encode_rendered` /
`render_conversation`, so the tokens they see agree token for token (rows fitted on one
rendering only fire where the runtime reads the same tokens).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

from engram_local.text import tokens as token_rules


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


@dataclass(frozen=True)
class ChatVocab:
    """What chat tokenization needs of a model's tokenizer: an HF tokenizer (`of`) or a runtime
    backend (llama.cpp has no HF tokenizer: its add-BOS flag and special texts come from its
    vocab)."""
    tokenize: Callable[[str, bool], list[int]]   # (text, add_bos) -> ids, special tokens parsed
    add_bos: bool                   # the model puts BOS in front of a sequence
    template: str | None            # the chat template (None: CHATML_TEMPLATE)
    bos_token: str = ""
    eos_token: str = ""
    end_of_turn: str = ""           # the text that closes an assistant reply

    @classmethod
    def of(cls, tok) -> "ChatVocab":
        return cls(tokenize=partial(token_rules.tokenize, tok), add_bos=token_rules.adds_bos(tok),
                   template=getattr(tok, "chat_template", None), end_of_turn=token_rules.end_of_turn(tok),
                   **token_rules.special_texts(tok))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return render_chat(self.template, messages, bos_token=self.bos_token, eos_token=self.eos_token,
                           add_generation_prompt=add_generation_prompt)


def encode_rendered(vocab: ChatVocab, rendered: str) -> list[int]:
    """Tokens of a rendered chat prompt: BOS only where the model adds one and the template did
    not write it (text.tokens.bos_needed)."""
    return vocab.tokenize(rendered, token_rules.bos_needed(rendered, vocab.bos_token, vocab.add_bos))


def render_conversation(vocab: ChatVocab, messages: list[dict], *,
                        reply_open: bool = False) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation as the runtime reads it and the model writes it (nanochat's
    render_conversation): the template's prompt up to each assistant turn (mask 0; BOS as
    `encode_rendered` puts it), then that reply tokenized on its own as the model generates it,
    closed by the end-of-turn text (mask 1). A conversation that ends with a user turn ends
    with the assistant's start (the runtime's chat prompt); `reply_open`: the last assistant
    reply is still being said (no end-of-turn after it), e.g. a recitation before a fact."""
    ids: list[int] = []
    mask: list[int] = []
    said = None                     # the rendered text the ids hold so far

    def prompt_up_to(i: int):
        text = vocab.render(messages[:i], add_generation_prompt=True)
        if said is None:
            part = encode_rendered(vocab, text)
        elif text.startswith(said):
            part = vocab.tokenize(text[len(said):], False)
        else:
            raise ChatTemplateError("the chat template renders earlier turns differently once a "
                                    "later turn follows; cannot tokenize the conversation turn by turn")
        ids.extend(part)
        mask.extend([0] * len(part))
        return text

    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        text = prompt_up_to(i)
        last = i == len(messages) - 1
        reply = m["content"] + ("" if (reply_open and last) else vocab.end_of_turn)
        part = vocab.tokenize(reply, False)
        ids.extend(part)
        mask.extend([1] * len(part))
        said = text + reply
    if not messages or messages[-1]["role"] != "assistant":
        prompt_up_to(len(messages))
    return ids, mask
