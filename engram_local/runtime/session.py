"""Backend-independent generation: load a model with a user's memory, prompt it, stream text.

`Session` opens a MODEL_DIR (or an Engram checkpoint, torch only), stacks the user's override
files over the Engram table (later files win on shared rows; a file bound to another model is
refused), and runs one of two backends behind one small interface (`tokenize`, `eval`,
`truncate`, `reset`, `detokenize`, `is_eog`, `tokens`):

  * llama.cpp (llama_backend.LlamaCppBackend): the backbone GGUF in llama.cpp, the Engram in C
    inside llama.cpp's graph; the default where llama-cpp-python is installed;
  * torch (torch_backend.TorchBackend): the same model in PyTorch, CPU or CUDA.

Generation runs through the engine (runtime.engine.Engine, the server's decode path too), with
`n_seq` sequences (1 for `run`): it reuses the backend's KV cache, so a new prompt that extends
what a sequence holds (the next chat turn) decodes only the new tokens; where it diverges, the
cache and the Engram state are rolled back to the common prefix.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence


from engram_local.runtime.engine import Engine, Request, Timings  # noqa: F401 (Timings re-exported)
from engram_local.runtime.sampling import Sampler
from engram_local.text.chat import CHATML_TEMPLATE, ChatTemplateError, render_chat  # noqa: F401 (re-exported)
from engram_local.text.chat import ChatVocab, encode_rendered
from engram_local.text.tokens import special_texts

BACKENDS = ("auto", "llama.cpp", "torch")
DEFAULT_CTX = 2048


class RunError(Exception):
    """A problem with the user's input (files, prompt, options), explained in the message."""


class PromptTooLong(RunError):
    pass


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- overrides

def open_override_stack(paths: Sequence[str | os.PathLike], sidecar, allow_missing_last: bool = False):
    """{layer: [native.OverrideSet, ...]} of the override files in order (later wins), opened
    by formats.eov.open_overrides for this sidecar's fingerprint and layers; its errors become
    RunError. `allow_missing_last` lets the last file not exist yet (the first /remember
    creates it).
    """
    from engram_local.formats.eov import open_overrides

    try:
        return open_overrides(paths, int(sidecar.fingerprint), engram_layers=sidecar.layer_ids,
                              allow_missing_last=allow_missing_last, model=str(sidecar.path.parent))
    except (ValueError, OSError) as exc:
        raise RunError(str(exc)) from None


# --------------------------------------------------------------------------- chat template


# --------------------------------------------------------------------------- timings

@dataclass
class Generation:
    text: str
    tokens: list[int]
    stop: str                       # "eog", "length", "context"
    timings: Timings = field(default_factory=Timings)


class _TextStream:
    """Incremental detokenisation: emits text only once its UTF-8 bytes are complete."""

    def __init__(self, backend, on_text: Callable[[str], None] | None):
        self.backend, self.on_text = backend, on_text
        self.tokens: list[int] = []
        self.emitted = ""
        self._bytes = getattr(backend, "token_bytes", None)
        self._buf = b""
        self._cache: dict[int, bytes] = {}

    def _text(self, final: bool) -> str:
        if self._bytes is not None:
            return self._buf.decode("utf-8", "replace")
        return self.backend.detokenize(self.tokens)

    def push(self, token: int) -> None:
        self.tokens.append(token)
        if self._bytes is not None:
            b = self._cache.get(token)
            if b is None:
                b = self._cache[token] = self._bytes(token)
            self._buf += b
        text = self._text(False)
        if text.endswith("\ufffd"):
            return                   # an incomplete UTF-8 sequence: wait for the next token
        self._emit(text)

    def _emit(self, text: str) -> None:
        if text.startswith(self.emitted):
            new = text[len(self.emitted):]
            if new:
                self.emitted = text
                if self.on_text:
                    self.on_text(new)

    def finish(self) -> str:
        text = self._text(True)
        self._emit(text)
        return text


# --------------------------------------------------------------------------- the session

class Session:
    """A loaded model (one backend) with a user's override stack, ready to generate."""

    def __init__(self, model: str | os.PathLike | None = None, *, overrides: Sequence[str] = (),
                 backend: str = "auto", n_ctx: int = DEFAULT_CTX, n_threads: int | None = None,
                 n_gpu_layers: int = 0, device: str | None = None, skill: bool = True,
                 allow_missing_last_override: bool = False, log: Callable[[str], None] = _stderr,
                 kv_f32: bool = False, adapter: str | os.PathLike | None = None, n_seq: int = 1,
                 max_queue: int = 64, route: bool = True):
        """adapter: a LoRA adapter GGUF to use instead of the MODEL_DIR's own (`skill` is then
        ignored), e.g. a per-user adapter in the head-to-head evaluation. n_seq: sequences the
        engine decodes together (llama.cpp backend; -c is then per sequence); max_queue: requests
        the engine queues beyond them. route: a chat reply about one of the user's facts opens
        with the words its rows were fitted after (`chat_opening`, runtime.routing)."""
        from engram_local.runtime import loader

        if backend not in BACKENDS:
            raise RunError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if n_ctx < 16:
            raise RunError(f"-c {n_ctx}: the context must hold at least 16 tokens")
        self.log = log
        self.override_paths = [Path(p) for p in overrides]
        self.route = bool(route) and skill and adapter is None
        self._openings: tuple | None = None     # (files' stat, routing.Openings)
        if model is not None:
            p = Path(model)
            if not p.exists():
                raise RunError(f"{p}: model not found (pass a MODEL_DIR from `engram-local convert`)")
            if not os.access(p, os.R_OK):
                raise RunError(f"{p}: model is not readable (permission denied)")
        try:
            target = loader.resolve(model)
        except FileNotFoundError as exc:
            raise RunError(str(exc)) from None
        self.model_dir = target if isinstance(target, loader.ModelDir) else None
        self.checkpoint = None if self.model_dir is not None else Path(target)
        self.sidecar = None
        stack = {}
        if self.model_dir is not None:
            from engram_local.formats.header import GGUFFormatError
            from engram_local.formats.sidecar import open_sidecar

            for f in (self.model_dir.backbone, self.model_dir.engram):
                if not os.access(f, os.R_OK):
                    raise RunError(f"{f}: not readable (permission denied)")
            try:
                self.sidecar = open_sidecar(self.model_dir.engram)
            except (GGUFFormatError, OSError) as exc:
                raise RunError(str(exc)) from None
            stack = open_override_stack(self.override_paths, self.sidecar, allow_missing_last_override)
        elif self.override_paths:
            raise RunError(f"{self.checkpoint}: user memory (--overrides) needs a MODEL_DIR; convert the "
                           "checkpoint with `engram-local convert` first")
        self.overrides = stack

        choice = backend
        if choice == "auto":
            from engram_local.runtime import llama_backend

            use_llama = (self.model_dir is not None and llama_backend.available()
                         and (device in (None, "cpu")))
            choice = "llama.cpp" if use_llama else "torch"
        if choice == "llama.cpp":
            from engram_local.runtime import llama_backend

            if self.model_dir is None:
                raise RunError(f"{self.checkpoint}: the llama.cpp backend needs a MODEL_DIR with a "
                               "backbone GGUF (convert the checkpoint, or use --backend torch)")
            if not llama_backend.available():
                raise RunError("--backend llama.cpp: llama-cpp-python is not installed "
                               f"(pip install llama-cpp-python=={llama_backend.PINNED_LLAMA_CPP_PYTHON})")
            if device not in (None, "cpu"):
                log(f"engram-local: --device {device} applies to the torch backend; llama.cpp uses -ngl")
            if n_seq < 1:
                raise RunError(f"n_seq {n_seq}: at least one sequence")
            # The setting's GGUF (skill on: the adapter folded in), the file torch loads too; an
            # explicit adapter runs as a LoRA over the plain backbone.
            backbone = self.model_dir.backbone_gguf(skill and adapter is None)
            if adapter is None:
                adapter = self.model_dir.unfolded_adapter(skill)   # an old MODEL_DIR only
            try:
                self.backend = llama_backend.LlamaCppBackend(
                    backbone, sidecar=self.sidecar, overrides=stack, adapter=adapter,
                    n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, kv_f32=kv_f32, log=log,
                    n_seq=n_seq, flash_attn=False if kv_f32 else None)
                # flash attention: llama.cpp's default (auto: on for the CPU), ~7 % faster decode
                # on the default model (bench/decode_cost.py); off with kv_f32 (exact comparisons)
            except (FileNotFoundError, PermissionError, llama_backend.LlamaCppError) as exc:
                raise RunError(str(exc)) from None
        else:
            from engram_local.runtime.torch_backend import TorchBackend

            if n_seq != 1:
                raise RunError("several sequences at once (n_seq > 1) need the llama.cpp backend")
            _quiet_transformers()
            try:
                loaded = None
                if adapter is not None:
                    if self.model_dir is None:
                        raise RunError("an explicit LoRA adapter needs a MODEL_DIR")
                    loaded = loader.load_model(self.model_dir.path, stack or None, adapter=False)[:2]
                    loader.merge_adapter_file(loaded[0].backbone, adapter, self.model_dir.backbone)
                self.backend = TorchBackend(model, overrides=stack or None, skill=skill, loaded=loaded,
                                            device=device or "cpu", n_ctx=n_ctx, n_threads=n_threads, log=log)
            except (FileNotFoundError, PermissionError, RuntimeError) as exc:
                raise RunError(str(exc)) from None
        self.backend_name = choice
        self.engine = Engine(self.backend, max_queue=max_queue, encode=self.encode, sidecar=self.sidecar, log=log)

    # ---------------------------------------------------------------- prompts
    @property
    def n_ctx(self) -> int:
        return self.backend.n_ctx

    def special_tokens(self) -> dict:
        be = self.backend
        if hasattr(be, "tok"):
            return special_texts(be.tok)
        ll = be._ll
        out = {}
        for key, fn in (("bos_token", ll.llama_vocab_bos), ("eos_token", ll.llama_vocab_eos)):
            t = fn(be.vocab)
            out[key] = ll.llama_vocab_get_text(be.vocab, t).decode("utf-8", "replace") if t >= 0 else ""
        return out

    def chat_template(self) -> str | None:
        return self.backend.chat_template

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return render_chat(self.chat_template(), messages, add_generation_prompt=add_generation_prompt,
                               **self.special_tokens())
        except ChatTemplateError as exc:
            raise RunError(str(exc)) from None

    def tokenize(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of a raw prompt, or (chat) of the text wrapped as one user turn."""
        if chat:
            return self.tokenize_rendered(self.render([{"role": "user", "content": text}]))
        return self.backend.tokenize(text)

    def encode(self, prompt: str | None, messages: list[dict] | None = None) -> list[int]:
        """Token ids of a text prompt (as is) or of chat messages (the chat template, ready for
        the assistant's turn): the engine's `encode`."""
        if messages is not None:
            return self.tokenize_rendered(self.render(messages))
        return self.backend.tokenize(prompt)

    def tokenize_rendered(self, rendered: str) -> list[int]:
        """Tokens of a rendered chat prompt: BOS only if the template did not write it (the one
        rule, text.chat.encode_rendered; the backend says whether the model adds BOS)."""
        vocab = ChatVocab(tokenize=self.backend.tokenize, add_bos=self.backend.add_bos,
                          template=self.chat_template(), **self.special_tokens())
        return encode_rendered(vocab, rendered)

    # ---------------------------------------------------------------- routing
    @functools.cached_property
    def echo_replies(self) -> bool:
        """Whether chat replies may open with a memory's fitted openings: routing on, and the
        skill adapter replies by echoing the question (else the rows were fitted after other
        words)."""
        from engram_local.formats.lora_adapter import adapter_chat_forms

        if not (self.route and self.model_dir is not None and self.model_dir.adapter is not None):
            return False
        return "echo" in (adapter_chat_forms(self.model_dir.adapter) or ())

    def reply_tokenize(self, text: str) -> list[int]:
        """Token ids of reply text as the model writes it (no BOS)."""
        return self.backend.tokenize(text, add_bos=False)

    def memory_openings(self) -> list:
        """The fitted reply openings of the facts in the override files (runtime.routing), read
        again when a file changed; [] without memory or without `echo_replies`."""
        from engram_local.formats.eov import read_memory_file
        from engram_local.runtime import routing

        if not (self.override_paths and self.echo_replies):
            return []
        stat = []
        for p in self.override_paths:
            try:
                st = p.stat()
                stat.append((str(p), st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                stat.append((str(p), None, None))
        if self._openings is None or self._openings[0] != stat:
            facts = []
            for p, mtime, _ in stat:
                if mtime is not None:
                    facts += read_memory_file(p).facts
            self._openings = (stat, routing.openings(facts, self.reply_tokenize))
        return self._openings[1]

    def chat_opening(self, prompt: Sequence[int], query: str | None = None):
        """The opening (runtime.routing.Route) a chat reply to `prompt` (a rendered chat prompt's
        ids) starts with: the best of the memory's fitted openings, when it passes the gate;
        None otherwise or without memory. `query`: the user's turn as typed, which picks the
        facts by relevance when the sentence encoder is installed (`encoder`). Leaves the backend
        holding `prompt`."""
        from engram_local.runtime import routing

        try:
            found = self.memory_openings()
        except (ValueError, OSError) as exc:        # a file that cannot be read: no routing
            self.log(f"engram-local: reply openings unavailable: {exc}")
            self._openings = None
            return None
        return self.engine.opening(prompt, found, neutral=self.neutral_prompts,
                                   **routing.turn_routing(found, lambda: self.encoder, query))

    @functools.cached_property
    def encoder(self):
        """The sentence encoder routing weighs facts with (runtime.retrieval.BertEncoder, loaded on
        first use), or None where it is not installed (routing then goes by likelihood alone)."""
        from engram_local.runtime.retrieval import sentence_encoder

        return sentence_encoder(self.log)

    @functools.cached_property
    def neutral_prompts(self) -> list[list[int]]:
        """runtime.routing.NEUTRAL_TURNS as chat prompts (what an opening's prior is taken after)."""
        from engram_local.runtime import routing

        return [self.tokenize(t, chat=True) for t in routing.NEUTRAL_TURNS]

    def reply_opening(self, prompt: Sequence[int], query: str | None = None) -> list[int]:
        """The tokens of `chat_opening` ([] when there is none): `generate(..., opening=)`."""
        route = self.chat_opening(prompt, query)
        return list(route.opening.tokens) if route is not None else []

    # ---------------------------------------------------------------- generation
    def generate(self, prompt: Sequence[int], n_predict: int, sampler: Sampler,
                 on_text: Callable[[str], None] | None = None, ignore_eos: bool = False,
                 opening: Sequence[int] = ()) -> Generation:
        """Continue `prompt` by at most n_predict tokens (stopping at an end-of-generation token
        or a full context, with a notice); streams text through on_text. `opening`: tokens the
        reply starts with (said first, counted in n_predict; `chat_opening`)."""
        be = self.backend
        prompt = [int(t) for t in prompt]
        opening = [int(t) for t in opening][:max(int(n_predict), 0)]
        if not prompt:
            raise RunError("the prompt is empty")
        if len(prompt) + len(opening) >= be.n_ctx:
            raise PromptTooLong(f"the prompt is {len(prompt)} tokens but the context holds {be.n_ctx} "
                                "(and at least one more is needed to generate): shorten the prompt "
                                "or raise -c")
        text = _TextStream(be, on_text)
        for tok in opening:
            text.push(tok)
        stream = self.engine.submit(Request(prompt + opening, max_tokens=n_predict - len(opening),
                                            sampler=sampler, ignore_eos=ignore_eos))
        for tok in stream:
            text.push(tok)
        if stream.finish_reason == "context":
            self.log(f"\nengram-local: the context ({be.n_ctx} tokens, -c) is full: stopped after "
                     f"{len(stream.tokens)} generated tokens")
        return Generation(text.finish(), opening + list(stream.tokens), stream.finish_reason, stream.timings)

    def use_backend(self, backend) -> None:
        """Decode through `backend` from now on (e.g. another build of the same model, as
        bench/agreement.py's variants): the current backend is closed and the engine rebuilt
        over the new one."""
        old, self.engine = self.engine, Engine(backend, max_queue=self.engine.max_queue, encode=self.encode,
                                               sidecar=self.sidecar, log=self.log)
        old.close()
        close = getattr(self.backend, "close", None)
        if close:
            close()
        self.backend = backend

    def reset(self) -> None:
        self.backend.reset()

    def reload_overrides(self, allow_missing_last: bool = True) -> None:
        """Re-read the override files (after a write) and swap them in; resets the sequence."""
        if self.sidecar is None:
            return
        self.overrides = open_override_stack(self.override_paths, self.sidecar, allow_missing_last)
        self.backend.set_overrides(self.sidecar, self.overrides)

    def close(self) -> None:
        self.engine.close()
        close = getattr(self.backend, "close", None)
        if close:
            close()


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
