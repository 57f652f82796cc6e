"""The llama.cpp backend: a stock backbone GGUF in llama.cpp, with the Engram term added in C.

llama-cpp-python's low-level API runs the backbone (`backbone.gguf` of a MODEL_DIR, memory-mapped,
optionally offloaded with -ngl). At every Engram layer L the residual stream entering it
(llama.cpp's graph node `l_out-(L-1)`) goes through the extension's C eval callback
(`ek_eval_callback`, native/engram_runtime.c): hash -> rows under the override stack -> W_K/W_V ->
gate -> value norm -> short conv with this sequence's history, added in place. No Python runs
inside the graph.

Node names like `l_out-15` are llama.cpp internals, not API: llama-cpp-python is pinned
(pyproject.toml) and every decode checks that each Engram layer fired exactly once, so a renamed
node fails loudly ("llama.cpp's graph has no node l_out-15 ...") instead of silently dropping
the Engram.

Several sequences (n_seq > 1) decode together: llama.cpp's seq_id per token, one unified KV
cache (each sequence may grow to n_ctx positions; the cache holds n_ctx x n_seq cells), and in
the runtime each sequence has its own Engram history and its own override stack (a user's
memory, `set_seq_stack`), which the C callback picks per token. Sequence 0 is also the
`Backend` sequence (`eval`, `truncate`, `reset`).

Rules the callback relies on: every llama_decode submits at most n_batch tokens and
n_ubatch = n_batch, so one decode is one ubatch; the KV cache is unified, so llama.cpp splits
batches with split_simple, which keeps the batch's row order; each sequence's tokens are one run
of consecutive rows (`decode_step` builds batches that way). Those rows are the ones announced
with `EngramRuntime.begin`.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Mapping, Sequence

import numpy as np

from engram_local import native
from engram_local.native.runtime import OverrideStacks
from engram_local.runtime.backend import Backend
from engram_local.runtime import pages
from engram_local.runtime.context import check_new_tokens

# The llama-cpp-python release whose graph node names this backend was written against.
PINNED_LLAMA_CPP_PYTHON = "0.3.36"


class LlamaCppError(RuntimeError):
    """llama.cpp refused to load a file or to decode."""


def _llama_cpp():
    import llama_cpp

    return llama_cpp


def available() -> bool:
    """Whether llama-cpp-python can be imported here."""
    try:
        _llama_cpp()
        return True
    except Exception:  # noqa: BLE001 - any import failure means "use torch"
        return False


# --------------------------------------------------------------------------- logging
# llama.cpp logs through a C callback; the ctypes object must outlive every later log call.
_LOG_CALLBACK = None


def quiet_llama_logs(verbose: bool | None = None) -> None:
    """Route llama.cpp's (and ggml's) own logging to nothing, or to stderr when verbose
    (default: the ENGRAM_LOCAL_LLAMA_LOG environment variable)."""
    global _LOG_CALLBACK
    llama_cpp = _llama_cpp()
    if verbose is None:
        verbose = os.environ.get("ENGRAM_LOCAL_LLAMA_LOG", "") not in ("", "0")

    def log(level, text, user_data):
        if verbose and text:
            sys.stderr.write(text.decode("utf-8", "replace"))

    cb = llama_cpp.llama_log_callback(log)
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    _LOG_CALLBACK = cb


# --------------------------------------------------------------------------- native handles

class _Native:
    """The one owner of one llama.cpp handle (llama-cpp-python's _internals.py idea): frees it
    exactly once, on close() or when collected.

    An owner whose handle others point into (a model under its context and adapter, an adapter
    set on a context) closes those users first (`add_user`, last added first), so neither an
    explicit close in any order nor garbage collection in any order frees a handle under one
    that still uses it. `keep` holds Python objects the handle points into (the eval callback)
    for as long as the handle lives.
    """

    def __init__(self, handle, free, *, keep=()):
        self.handle = handle
        self._free = free
        self._users: list[_Native] = []
        self._keep = tuple(keep)

    def __bool__(self) -> bool:
        return self.handle is not None

    def add_user(self, owner: "_Native") -> None:
        """`owner`'s handle uses this one: it is closed before this one is freed."""
        self._users.append(owner)

    def close(self) -> None:
        handle, self.handle = self.handle, None
        if handle is None:
            return
        try:
            while self._users:
                self._users.pop().close()
        finally:
            self._free(handle)
            self._keep = ()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# --------------------------------------------------------------------------- ggml entry points

def _ggml_base_library():
    llama_cpp = _llama_cpp()
    lib_dir = Path(llama_cpp.__file__).resolve().parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (lib_dir / name).exists():
            return ctypes.CDLL(str(lib_dir / name))
    raise LlamaCppError(f"{lib_dir}: no libggml-base library in llama-cpp-python's package")


_GGML = None


def ggml_api() -> dict:
    """Addresses of the ggml functions the C callback calls (native.EngramRuntime's `ggml`)."""
    global _GGML
    if _GGML is None:
        lib = _ggml_base_library()
        names = {"get_name": "ggml_get_name", "nelements": "ggml_nelements", "nbytes": "ggml_nbytes",
                 "tensor_get": "ggml_backend_tensor_get", "tensor_set": "ggml_backend_tensor_set",
                 "is_contiguous": "ggml_is_contiguous"}
        _GGML = {key: ctypes.cast(getattr(lib, sym), ctypes.c_void_p).value for key, sym in names.items()}
        _GGML["_lib"] = lib
    return _GGML


def node_name(layer: int) -> str:
    """llama.cpp's graph node holding the input of decoder layer `layer`."""
    return "embd" if layer == 0 else f"l_out-{layer - 1}"


# --------------------------------------------------------------------------- Engram pieces

def engram_kernels(sidecar, overrides: Mapping[int, Sequence[native.OverrideSet]] | None = None):
    """[native.EngramLayerKernel] for each Engram layer of an open sidecar (formats.sidecar.Sidecar)."""
    from engram_local.formats.eov import check_engram_layers

    cfg = SimpleNamespace(**sidecar.settings)      # sidecar.config would import torch
    layout = sidecar.layout
    overrides = dict(overrides or {})
    check_engram_layers(overrides, cfg.layer_ids)
    kernels = []
    for layer in cfg.layer_ids:
        st = sidecar.layer_state(layer)
        kernels.append(native.EngramLayerKernel(
            sidecar.table(layer), overrides.get(layer, ()), layout.kernel_args(layer),
            w_k=st["w_k.weight"], w_v=st["w_v.weight"], norm_q=st["norm_q.weight"],
            norm_k=st["norm_k.weight"], norm_v=st["norm_v.weight"], conv=st["conv.weight"],
            eps=cfg.norm_eps, dilation=cfg.max_ngram_size))
    return kernels


# --------------------------------------------------------------------------- the session

class LlamaCppBackend(Backend):
    """One llama.cpp context over a backbone GGUF, with an optional Engram and LoRA adapter.

    `eval(tokens)` appends tokens to sequence 0 and returns the last position's logits;
    `truncate(n)` rolls the KV cache and the Engram state back to n positions (so a chat turn
    re-decodes only what changed); `reset()` forgets everything (runtime.backend.Backend).
    With n_seq > 1, `decode_step` decodes several sequences in one llama_decode (each with its
    own override stack, `set_seq_stack`); `eval` goes through the same step.
    The model, context, batch and adapter handles each have one owner (_Native) that frees them.
    """

    name = "llama.cpp"

    def __init__(self, backbone: str | os.PathLike, *, sidecar=None, overrides=None,
                 adapter: str | os.PathLike | None = None, n_ctx: int = 2048, n_batch: int = 512,
                 n_threads: int | None = None, n_gpu_layers: int = 0, flash_attn: bool | None = False,
                 kv_f32: bool = False, log=None, n_seq: int = 1):
        self._model = self._ctx = self._batch = self._adapter = None   # close() works from here on
        self.runtime = None
        llama_cpp = _llama_cpp()
        self._ll = llama_cpp
        self._log = log or (lambda msg: print(msg, file=sys.stderr))
        quiet_llama_logs()
        backbone = Path(backbone)
        if not backbone.is_file():
            raise FileNotFoundError(f"{backbone}: backbone GGUF not found")
        if not os.access(backbone, os.R_OK):
            raise PermissionError(f"{backbone}: backbone GGUF is not readable")
        llama_cpp.llama_backend_init()

        mparams = llama_cpp.llama_model_default_params()
        # Weights read into malloc'd memory where this process's malloc uses huge pages (the CLI
        # arranges it: runtime.pages), mapped from the file otherwise.
        self.load_mode = "read" if pages.active() else "mmap"
        mparams.load_mode = (llama_cpp.LLAMA_LOAD_MODE_NONE if self.load_mode == "read"
                             else llama_cpp.LLAMA_LOAD_MODE_MMAP)
        if n_gpu_layers and not llama_cpp.llama_supports_gpu_offload():
            self._log("engram-local: this llama.cpp build has no GPU support; -ngl ignored")
            n_gpu_layers = 0
        mparams.n_gpu_layers = int(n_gpu_layers)
        model = llama_cpp.llama_model_load_from_file(str(backbone).encode(), mparams)
        if not model:
            raise LlamaCppError(f"{backbone}: llama.cpp could not load this backbone GGUF "
                                "(set ENGRAM_LOCAL_LLAMA_LOG=1 to see llama.cpp's reason)")
        self._model = _Native(model, llama_cpp.llama_model_free)
        try:
            self._setup(backbone, sidecar, overrides, adapter, n_ctx, n_batch, n_threads, flash_attn, kv_f32,
                        max(1, int(n_seq)))
        except BaseException:
            self.close()
            raise

    def _setup(self, backbone, sidecar, overrides, adapter, n_ctx, n_batch, n_threads, flash_attn, kv_f32, n_seq):
        ll, model = self._ll, self._model.handle
        self.vocab = ll.llama_model_get_vocab(model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(ll.llama_model_n_embd(model))
        self.n_layer = int(ll.llama_model_n_layer(model))
        n_ctx = int(n_ctx) if n_ctx else int(ll.llama_model_n_ctx_train(model))
        self.n_ctx = n_ctx                      # positions per sequence
        self.n_seq = n_seq
        self.n_batch = max(1, min(int(n_batch), n_ctx * n_seq))
        # Default threads: half the cores for one-token decodes (memory-bound: more threads only
        # add synchronisation on a shared machine), all of them for batches of several tokens
        # (prompt chunks, several sequences' steps: compute-bound). llama.cpp picks n_threads
        # for a one-token ubatch and n_threads_batch otherwise. An explicit -t sets both.
        threads = int(n_threads) if n_threads else max(1, (os.cpu_count() or 2) // 2)
        threads_batch = int(n_threads) if n_threads else max(1, os.cpu_count() or 2)

        if sidecar is not None:
            cfg = SimpleNamespace(**sidecar.settings)
            if cfg.hidden_size != self.n_embd:
                raise ValueError(f"{backbone}: width {self.n_embd}, but the Engram writes into width "
                                 f"{cfg.hidden_size}")
            bad = [l for l in cfg.layer_ids if l >= self.n_layer - 1]
            if bad:
                # The last layer keeps only output rows before l_out: nothing past it can be fed.
                raise ValueError(f"Engram layers {bad} cannot run in llama.cpp: the backbone has "
                                 f"{self.n_layer} layers and the input of the last one is not a "
                                 "full-sequence node")
            cmap = np.asarray(sidecar.canonical_map(), dtype=np.int64)
            if cmap.shape[0] < self.n_vocab:
                raise ValueError(f"the Engram's canonical map covers {cmap.shape[0]} token ids, the "
                                 f"backbone has {self.n_vocab}")
            self.runtime = native.EngramRuntime(engram_kernels(sidecar, overrides), list(cfg.layer_ids),
                                                cmap, n_ctx, self.n_batch, ggml_api(), n_seqs=n_seq)

        cparams = ll.llama_context_default_params()
        cparams.n_ctx = n_ctx * n_seq
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch          # one decode = one ubatch (the callback relies on it)
        cparams.n_seq_max = n_seq
        cparams.kv_unified = True                # split_simple: llama.cpp keeps the batch's row order
        cparams.n_threads = threads
        cparams.n_threads_batch = threads_batch
        cparams.no_perf = True
        self.flash_attn = flash_attn             # None: llama.cpp's default (auto)
        cparams.flash_attn_type = (ll.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn is None     # llama.cpp's default
                                   else ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                   else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        if kv_f32:                               # exact comparisons with torch (tests)
            cparams.type_k = cparams.type_v = 0  # GGML_TYPE_F32
        keep = ()
        if self.runtime is not None:
            cb = ll.ggml_backend_sched_eval_callback(self.runtime.callback_address)
            cparams.cb_eval = cb
            cparams.cb_eval_user_data = ctypes.c_void_p(self.runtime.user_data_address)
            keep = (cb, self.runtime)            # what the context calls into, alive as long as it
        ctx = ll.llama_init_from_model(model, cparams)
        if not ctx:
            raise LlamaCppError(f"llama.cpp could not create a context of {n_ctx} tokens "
                                "(out of memory? try a smaller -c)")
        self._ctx = _Native(ctx, ll.llama_free, keep=keep)
        self._model.add_user(self._ctx)
        self._mem = ll.llama_get_memory(ctx)     # borrowed: freed with the context

        if adapter is not None:
            adapter = Path(adapter)
            if not adapter.is_file():
                raise FileNotFoundError(f"{adapter}: skill adapter not found")
            lora = ll.llama_adapter_lora_init(model, str(adapter).encode())
            if not lora:
                raise LlamaCppError(f"{adapter}: llama.cpp could not load this LoRA adapter "
                                    "(set ENGRAM_LOCAL_LLAMA_LOG=1 to see why)")
            self._adapter = _Native(lora, ll.llama_adapter_lora_free)
            self._model.add_user(self._adapter)  # freed before the model (which would free it too)
            self._adapter.add_user(self._ctx)    # the context applies it: freed first
            arr = (ll.llama_adapter_lora_p_ctypes * 1)(lora)
            scales = (ctypes.c_float * 1)(1.0)
            if ll.llama_set_adapters_lora(ctx, arr, 1, scales):
                raise LlamaCppError(f"{adapter}: llama.cpp could not apply the LoRA adapter")

        self._batch = _Native(ll.llama_batch_init(self.n_batch, 0, 1), ll.llama_batch_free)
        self._tok = np.zeros(self.n_batch, np.int32)       # the batch's tokens and seq ids for the runtime
        self._sid = np.zeros(self.n_batch, np.int32)
        self._more: dict[int, list[int]] = {s: [] for s in range(1, n_seq)}   # sequences 1..: tokens held
        self._stacks: dict[int, OverrideStacks | None] = {}
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self.vocab))
        self._eog: dict[int, bool] = {}
        self.tokens: list[int] = []          # what the KV cache and Engram state hold
        self.chat_template = self._chat_template()

    def _chat_template(self) -> str | None:
        tmpl = self._ll.llama_model_chat_template(self._model.handle, None)
        return tmpl.decode("utf-8") if tmpl else None

    # ---------------------------------------------------------------- text
    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text` (special tokens like <|im_start|> parsed; BOS as the model says)."""
        ll = self._ll
        data = text.encode("utf-8")
        add = self.add_bos if add_bos is None else add_bos
        cap = len(data) + 8
        buf = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self.vocab, data, len(data), buf, cap, add, True)
        if n < 0:
            cap = -n
            buf = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self.vocab, data, len(data), buf, cap, add, True)
            if n < 0:
                raise LlamaCppError("llama.cpp could not tokenize the text")
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens render as nothing)."""
        ll = self._ll
        buf = ctypes.create_string_buffer(64)
        n = ll.llama_token_to_piece(self.vocab, int(token), buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self.vocab, int(token), buf, -n, 0, False)
        return buf.raw[:max(n, 0)]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        token = int(token)
        hit = self._eog.get(token)
        if hit is None:
            hit = self._eog[token] = bool(self._ll.llama_vocab_is_eog(self.vocab, token))
        return hit

    # ---------------------------------------------------------------- the decode step
    def _run(self, entries, all_logits: bool = False) -> list:
        """The one llama_decode of this backend: `entries` [(seq, tokens, want_logits)], each
        sequence at most once, continuing at its positions; returns, per entry, its last token's
        logits (float32 [n_vocab], a copy) where wanted, else None (all_logits, one entry: every
        row, [n, n_vocab]). Token lists are not extended here. On failure the Engram runtime
        abandons the batch and the caller resets."""
        ll, b, ctx = self._ll, self._batch.handle, self._ctx.handle
        i, last_rows = 0, []
        for seq, chunk, want in entries:
            pos0 = len(self.seq_tokens(seq))
            for j, t in enumerate(chunk):
                b.token[i] = t
                b.pos[i] = pos0 + j
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = 1 if all_logits or (want and j == len(chunk) - 1) else 0
                self._tok[i], self._sid[i] = t, seq
                i += 1
            last_rows.append(i - 1 if want else None)
        b.n_tokens = n = i
        rt = self.runtime
        if rt is not None:
            rt.begin(self._tok[:n], self._sid[:n] if self.n_seq > 1 else None)
        rc = ll.llama_decode(ctx, b)
        if rt is not None:
            if rt.status:
                rt.abort()
                rt.check()
            if rc != 0:
                rt.abort()
        if rc != 0:
            raise LlamaCppError(f"llama_decode failed with status {rc}"
                                + (" (no room in the KV cache)" if rc == 1 else ""))
        if rt is not None:
            rt.commit()
        if all_logits:
            ptr = ll.llama_get_logits(ctx)
            return [np.ctypeslib.as_array(ptr, shape=(n * self.n_vocab,)).reshape(n, self.n_vocab).copy()]
        return [None if r is None else
                np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, r), shape=(self.n_vocab,)).copy()
                for r in last_rows]

    def decode_step(self, entries) -> list:
        """Decode several sequences in one llama_decode: entries [(seq, tokens, want_logits)] (each
        sequence once, at most n_batch tokens in all); each sequence's tokens are appended to it.
        Returns per entry its last token's logits or None (runtime.backend.Backend). A failure
        forgets every sequence before it is raised."""
        entries = [(int(seq), check_new_tokens(toks, len(self.seq_tokens(seq)), self.n_ctx, self.n_vocab),
                    bool(want)) for seq, toks, want in entries]
        seqs = [e[0] for e in entries]
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"a sequence appears twice in one decode step: {seqs}")
        if not entries or sum(len(e[1]) for e in entries) > self.n_batch:
            raise ValueError(f"a decode step takes 1..{self.n_batch} tokens (n_batch)")
        try:
            out = self._run(entries)
        except BaseException:
            self.reset_all()
            raise
        for seq, toks, _ in entries:
            self.seq_tokens(seq).extend(toks)
        return out

    def seq_tokens(self, seq: int) -> list[int]:
        if seq == 0:
            return self.tokens
        if seq not in self._more:
            raise ValueError(f"sequence {seq} outside [0, {self.n_seq})")
        return self._more[seq]

    def seq_truncate(self, seq: int, n: int) -> None:
        """Keep the first n positions of sequence seq (its KV cells and Engram state)."""
        if seq == 0:
            self.truncate(n)
            return
        toks = self.seq_tokens(seq)
        n = max(0, min(int(n), len(toks)))
        if n == len(toks):
            return
        if not self._ll.llama_memory_seq_rm(self._mem, seq, n, -1):
            n = 0
            self._ll.llama_memory_seq_rm(self._mem, seq, 0, -1)
        if self.runtime is not None:
            self.runtime.truncate(n, seq)
        del toks[n:]

    def set_seq_stack(self, seq: int, stack: OverrideStacks | None) -> None:
        """Sequence seq reads `stack` (from `make_stack`; None: the backend's own --overrides)
        from now on; a different stack than before forgets the sequence (its state was computed
        with other rows)."""
        if stack is self._stacks.get(seq):
            return
        if self.runtime is None:
            if stack is not None:
                raise RuntimeError("this backend runs without an Engram: no user memory")
            return
        self.seq_truncate(seq, 0)
        self.runtime.set_stacks(seq, stack)
        self._stacks[seq] = stack

    def make_stack(self, sidecar, overrides) -> OverrideStacks:
        """A user's override stack ({layer: [native.OverrideSet]}) for set_seq_stack; shared by
        any number of sequences, the rows are not copied."""
        from engram_local.formats.eov import check_engram_layers

        if self.runtime is None:
            raise RuntimeError("this backend runs without an Engram: no user memory")
        overrides = dict(overrides or {})
        check_engram_layers(overrides, sidecar.layer_ids)
        return self.runtime.stacks([overrides.get(layer, ()) for layer in sidecar.layer_ids])

    def reset_all(self) -> None:
        """Forget every sequence (the whole KV cache and Engram state)."""
        if self._ctx:
            self._ll.llama_memory_clear(self._mem, True)
        if self.runtime is not None:
            self.runtime.reset()
        self.tokens = []
        for toks in self._more.values():
            toks.clear()

    # ---------------------------------------------------------------- the sequence (Backend hooks)
    def _decode(self, chunk: list[int], all_logits: bool, last: bool) -> np.ndarray | None:
        rows = self._run([(0, chunk, last)], all_logits)     # the decode step, sequence 0 alone
        return rows[0] if all_logits or rows[0] is None else rows[0][None, :]

    def _rollback(self, n: int) -> bool:
        """Drop sequence 0's KV cells n.. and its Engram state after n; False where llama.cpp refuses."""
        if not self._ll.llama_memory_seq_rm(self._mem, 0, n, -1):
            return False
        if self.runtime is not None:
            self.runtime.truncate(n)
        return True

    def _clear(self) -> None:
        """Sequence 0 forgotten: its KV cells, its Engram history (a single-sequence backend: the
        whole cache and runtime, as before; a failed runtime is reset whole)."""
        if self.n_seq == 1 or (self.runtime is not None and self.runtime.status):
            self.reset_all()
            return
        if self._ctx:
            self._ll.llama_memory_seq_rm(self._mem, 0, 0, -1)
        if self.runtime is not None and self.runtime.n_past:
            self.runtime.truncate(0, 0)

    def set_overrides(self, sidecar, overrides) -> None:
        """Swap the user memory (override stacks); the sequence is reset."""
        from engram_local.formats.eov import check_engram_layers

        if self.runtime is None:
            raise RuntimeError("this session runs without an Engram")
        layers = dict(zip(sidecar.layer_ids, self.runtime.layers))
        overrides = dict(overrides or {})
        check_engram_layers(overrides, sorted(layers))
        for layer, kernel in layers.items():
            kernel.set_overrides(overrides.get(layer, ()))
        self.runtime.refresh_layers()
        self.reset_all()

    def close(self) -> None:
        """Free the batch, context, adapter and model (each by its owner, once); safe to call twice.
        Without close(), the owners free them when collected."""
        for owner in (self._batch, self._ctx, self._adapter, self._model):
            if owner is not None:
                owner.close()
