"""The Engram runtime of native/engram_runtime.c: the Engram term of a layer in C (one sequence,
or a batch of several, `EngramLayerKernel.forward_batch`), and the per-sequence state of the
llama.cpp backend whose eval callback adds it to llama.cpp's residual stream: up to n_seqs
sequences, each with its own history and override stacks (`OverrideStacks`, a user's memory).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from engram_local._engram_native import ffi, lib
from engram_local.native.checks import (INT32_MAX, INT64_MAX, STATUS_NAMES, STATUS_TEXT, f32_array, f32_ptr,
                                        fail, i64_ptr, int64_array, int_param)
from engram_local.native.kernel import OverrideSet, Table, override_stack


class EngramRuntimeError(RuntimeError):
    """The Engram runtime refused a batch or failed inside llama.cpp's graph; `status` is the
    ek_status code."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class EngramLayerKernel:
    """One Engram layer for the C kernel: hash constants, table + override stack, weights.

    w_k, w_v: torch layout [D, E] (stored transposed here); norm_*: [D]; conv: [D, kernel] or
    [D, 1, kernel]; hash_args: `NgramHashLayout.kernel_args(layer)`. Arrays are copied once
    (float32, contiguous) and kept alive by this object.
    """

    def __init__(self, table: Table, overrides: Iterable[OverrideSet], hash_args: dict, *,
                 w_k, w_v, norm_q, norm_k, norm_v, conv, eps: float, dilation: int):
        if not isinstance(table, Table):
            raise TypeError(f"table must be a Table, got {type(table).__name__}")
        N = int_param("max_ngram", hash_args["max_ngram"], lo=2, hi=INT32_MAX)
        K = int_param("n_head", hash_args["n_head"], lo=1, hi=INT32_MAX)
        w_k = np.asarray(w_k, dtype=np.float32)
        if w_k.ndim != 2:
            raise ValueError(f"w_k must be 2-D [D, E], got shape {w_k.shape}")
        D, E = (int(s) for s in w_k.shape)
        if E != (N - 1) * K * table.dim:
            raise ValueError(f"w_k has {E} inputs; (max_ngram-1) * n_head * head_dim = "
                             f"{(N - 1) * K * table.dim}")
        conv = np.asarray(conv, dtype=np.float32)
        conv = conv.reshape(conv.shape[0], -1) if conv.ndim == 3 else conv
        if conv.ndim != 2 or conv.shape[0] != D or conv.shape[1] < 1:
            raise ValueError(f"conv must be [D={D}, kernel], got shape {conv.shape}")
        self.hidden, self.mem_dim, self.kernel = D, E, int(conv.shape[1])
        self.dilation = int_param("dilation", dilation, lo=1, hi=INT32_MAX)
        self.max_ngram, self.n_head = N, K
        self.table = table
        self._w_k_t = np.ascontiguousarray(w_k.T)
        self._w_v_t = np.ascontiguousarray(f32_array("w_v", w_v, (D, E)).T)
        self._norms = [f32_array(n, a, (D,)) for n, a in
                       (("norm_q", norm_q), ("norm_k", norm_k), ("norm_v", norm_v))]
        self._conv_t = np.ascontiguousarray(conv.T)
        self._hash = {k: int64_array(k, hash_args[k], ndim=1)
                      for k in ("multipliers", "primes", "offsets")}
        if self._hash["multipliers"].shape[0] != N or any(
                self._hash[k].shape[0] != (N - 1) * K for k in ("primes", "offsets")):
            raise ValueError("hash_args arrays do not match max_ngram / n_head")
        self._keep = [ffi.from_buffer("int64_t[]", self._hash[k]) for k in ("multipliers", "primes", "offsets")]
        self._c = ffi.new("ek_engram_layer *")
        c = self._c
        c.hash.max_ngram, c.hash.n_head = N, K
        c.hash.vocab = int_param("vocab", hash_args["vocab"], lo=1, hi=INT64_MAX)
        c.hash.pad_id = int_param("pad_id", hash_args["pad_id"], lo=0, hi=int(hash_args["vocab"]) - 1)
        c.hash.multipliers, c.hash.primes, c.hash.offsets = self._keep
        c.table = table._c[0]
        c.hidden, c.mem_dim = D, E
        self._ptrs = [f32_ptr(a) for a in (self._w_k_t, self._w_v_t, *self._norms, self._conv_t)]
        c.w_k_t, c.w_v_t, c.norm_q, c.norm_k, c.norm_v, c.conv_t = self._ptrs
        c.kernel, c.dilation = self.kernel, self.dilation
        c.eps = float(eps)
        self.set_overrides(overrides)
        n_i, n_f = ffi.new("int64_t *"), ffi.new("int64_t *")
        status = lib.ek_engram_scratch(self._c, 1, n_i, n_f)
        if status:
            fail(status, "EngramLayerKernel")

    def set_overrides(self, overrides: Iterable[OverrideSet]) -> None:
        """Replace the override stack (later sets win), validated against the table."""
        sets, c_sets = override_stack(self.table, overrides)
        self._sets, self._c_sets = sets, c_sets
        self._c.ovs, self._c.n_ovs = c_sets, len(sets)

    def forward(self, h, ids, ids_start: int, xs: np.ndarray, xs_start: int) -> tuple[np.ndarray, int]:
        """(y [T, D], override hits) for hidden states h [T, D] at positions ids_start.. of
        canonical `ids`; xs [rows, D] float32 holds x of earlier positions and receives the
        new rows at xs_start.. (see native/engram.h ek_engram_forward)."""
        h = f32_array("h", h)
        if h.ndim != 2 or h.shape[1] != self.hidden:
            raise ValueError(f"h must be [T, {self.hidden}], got {h.shape}")
        ids = int64_array("ids", ids, ndim=1)
        if not (isinstance(xs, np.ndarray) and xs.dtype == np.float32 and xs.flags.c_contiguous
                and xs.ndim == 2 and xs.shape[1] == self.hidden):
            raise ValueError(f"xs must be a C-contiguous float32 [rows, {self.hidden}] array")
        T = h.shape[0]
        n_i, n_f = ffi.new("int64_t *"), ffi.new("int64_t *")
        lib.ek_engram_scratch(self._c, T, n_i, n_f)
        si, sf = np.empty(max(1, n_i[0]), np.int64), np.empty(max(1, n_f[0]), np.float32)
        y = np.empty((T, self.hidden), np.float32)
        hits = ffi.new("int64_t *")
        status = lib.ek_engram_forward(self._c, f32_ptr(h), T, i64_ptr(ids), ids.shape[0],
                                       int_param("ids_start", ids_start, lo=0),
                                       f32_ptr(xs, True), xs.shape[0], int_param("xs_start", xs_start, lo=0),
                                       f32_ptr(y, True), y.size, i64_ptr(si, True), si.size,
                                       f32_ptr(sf, True), sf.size, hits)
        if status:
            fail(status, "engram_forward")
        return y, int(hits[0])


    def forward_batch(self, h, segments) -> tuple[np.ndarray, int]:
        """(y [T, D], override hits) of a batch of several sequences (native/engram.h
        ek_engram_forward_batch): h [T, D] holds each segment's rows in turn; segments is a list
        of (ids, ids_start, xs, xs_start, n, override sets) with the meanings of `forward`'s
        arguments (n tokens; override sets: that sequence's stack, later sets win)."""
        h = f32_array("h", h)
        if h.ndim != 2 or h.shape[1] != self.hidden:
            raise ValueError(f"h must be [T, {self.hidden}], got {h.shape}")
        T = h.shape[0]
        segs = ffi.new("ek_segment[]", max(1, len(segments)))
        keep = []
        for i, (ids, ids_start, xs, xs_start, n, sets) in enumerate(segments):
            ids = int64_array("ids", ids, ndim=1)
            if not (isinstance(xs, np.ndarray) and xs.dtype == np.float32 and xs.flags.c_contiguous
                    and xs.ndim == 2 and xs.shape[1] == self.hidden):
                raise ValueError(f"segments[{i}]: xs must be a C-contiguous float32 [rows, {self.hidden}] array")
            sets, c_sets = override_stack(self.table, sets)
            keep.append((ids, sets, c_sets))
            sg = segs[i]
            sg.n = int_param("n", n, lo=1)
            sg.ids, sg.n_ids, sg.ids_start = i64_ptr(ids), ids.shape[0], int_param("ids_start", ids_start, lo=0)
            sg.xs, sg.xs_rows, sg.xs_start = f32_ptr(xs, True), xs.shape[0], int_param("xs_start", xs_start, lo=0)
            sg.stack.ovs, sg.stack.n_ovs = (c_sets if sets else ffi.NULL), len(sets)
        n_i, n_f = ffi.new("int64_t *"), ffi.new("int64_t *")
        lib.ek_engram_scratch(self._c, T, n_i, n_f)
        si, sf = np.empty(max(1, n_i[0]), np.int64), np.empty(max(1, n_f[0]), np.float32)
        y = np.empty((T, self.hidden), np.float32)
        hits = ffi.new("int64_t *")
        status = lib.ek_engram_forward_batch(self._c, f32_ptr(h), T, segs, len(segments), f32_ptr(y, True),
                                             y.size, i64_ptr(si, True), si.size, f32_ptr(sf, True), sf.size, hits)
        if status:
            fail(status, "engram_forward_batch")
        return y, int(hits[0])

class OverrideStacks:
    """One user's override sets for every Engram layer of a runtime (native/engram.h `ek_stack`
    per layer), as `EngramRuntime.set_stacks` gives them to a sequence. Immutable; any number of
    sequences may share it: the rows stay where they are (e.g. an .eov mmap), nothing is copied.

    layers: the runtime's EngramLayerKernel list; per_layer: one iterable of OverrideSet per
    layer (later sets win), each validated against its layer's table here.
    """

    def __init__(self, layers: list[EngramLayerKernel], per_layer: list[Iterable[OverrideSet]]):
        if len(per_layer) != len(layers):
            raise ValueError(f"need one override list per Engram layer ({len(layers)}), got {len(per_layer)}")
        self._c = ffi.new("ek_stack[]", len(layers))
        self._keep = []
        self.n_sets = 0
        for i, (layer, sets) in enumerate(zip(layers, per_layer)):
            sets, c_sets = override_stack(layer.table, sets)
            self._keep.append((sets, c_sets))
            self._c[i].ovs = c_sets if sets else ffi.NULL
            self._c[i].n_ovs = len(sets)
            self.n_sets += len(sets)


class EngramRuntime:
    """Engram state for llama.cpp's eval callback (native/engram.h `ek_runtime`): up to n_seqs
    sequences (llama.cpp seq ids 0..n_seqs-1), each with its own canonical ids, short-conv
    history and override stacks, decoded together in one batch.

    ggml: addresses (ints) of ggml_get_name, ggml_nelements, ggml_nbytes,
    ggml_backend_tensor_get, ggml_backend_tensor_set and ggml_is_contiguous in the
    libggml-base llama.cpp loaded.
    Use `callback_address` as llama_context_params.cb_eval and `user_data_address` as
    cb_eval_user_data; per llama_decode: begin(tokens, seq_ids) -> decode -> commit() (or abort()).
    """

    _GGML_SIGS = {"get_name": "const char *(*)(void *)", "nelements": "int64_t (*)(void *)",
                  "nbytes": "size_t (*)(void *)",
                  "tensor_get": "void (*)(void *, void *, size_t, size_t)",
                  "tensor_set": "void (*)(void *, const void *, size_t, size_t)",
                  "is_contiguous": "bool (*)(void *)"}

    def __init__(self, layers: list[EngramLayerKernel], inject: list[int], canonical_map,
                 n_ctx: int, max_tokens: int, ggml: dict, n_seqs: int = 1):
        if not layers or len(layers) != len(inject):
            raise ValueError("need one inject layer index per Engram layer (and at least one layer)")
        self.layers = list(layers)
        self.inject = [int(i) for i in inject]
        self.n_ctx = int_param("n_ctx", n_ctx, lo=1)
        self.max_tokens = int_param("max_tokens", max_tokens, lo=1)
        self.n_seqs = int_param("n_seqs", n_seqs, lo=1, hi=INT32_MAX)
        self.hidden = layers[0].hidden
        self._map = int64_array("canonical_map", canonical_map, ndim=1)
        self._inject = np.asarray(self.inject, dtype=np.int32)
        self._ids = np.zeros((self.n_seqs, self.n_ctx), np.int64)
        self._xs = np.zeros((self.n_seqs, len(layers), self.n_ctx, self.hidden), np.float32)
        self._fired = np.zeros(len(layers), np.int32)
        self._batch_seqs = np.zeros(self.n_seqs, np.int32)
        self._c_layers = ffi.new("ek_engram_layer[]", len(layers))
        self._seqs = ffi.new("ek_seq[]", self.n_seqs)
        self._segs = ffi.new("ek_segment[]", self.n_seqs)
        self._stacks: list[OverrideStacks | None] = [None] * self.n_seqs
        rt = self._rt = ffi.new("ek_runtime *")
        for name, sig in self._GGML_SIGS.items():
            setattr(rt.ggml, name, ffi.cast(sig, int(ggml[name])))
        self._keep = [ffi.from_buffer("int32_t[]", self._inject), i64_ptr(self._map),
                      i64_ptr(self._ids, True), f32_ptr(self._xs, True),
                      ffi.from_buffer("int32_t[]", self._fired, require_writable=True),
                      ffi.from_buffer("int32_t[]", self._batch_seqs, require_writable=True)]
        ids_p, xs_p = self._keep[2], self._keep[3]
        seq_xs = len(layers) * self.n_ctx * self.hidden
        for s in range(self.n_seqs):
            self._seqs[s].ids = ids_p + s * self.n_ctx
            self._seqs[s].xs = xs_p + s * seq_xs
            self._seqs[s].stacks = ffi.NULL
        rt.layers, rt.n_layers = self._c_layers, len(layers)
        rt.inject, rt.canonical_map, rt.fired = self._keep[0], self._keep[1], self._keep[4]
        rt.seqs, rt.n_seqs, rt.batch_seqs, rt.segs = self._seqs, self.n_seqs, self._keep[5], self._segs
        rt.map_len, rt.n_ctx, rt.max_tokens = self._map.shape[0], self.n_ctx, self.max_tokens
        rt.enabled = 1
        self.refresh_layers()
        n_i, n_f = ffi.new("int64_t *"), ffi.new("int64_t *")
        status = lib.ek_runtime_scratch(rt, n_i, n_f)
        if status:
            fail(status, "EngramRuntime")
        self._si = np.empty(max(1, n_i[0]), np.int64)
        self._sf = np.empty(max(1, n_f[0]), np.float32)
        self._keep += [i64_ptr(self._si, True), f32_ptr(self._sf, True)]
        rt.scratch_i64, rt.cap_i64 = self._keep[-2], self._si.size
        rt.scratch_f32, rt.cap_f32 = self._keep[-1], self._sf.size
        if lib.ek_runtime_init(rt):
            self._raise("EngramRuntime")

    def refresh_layers(self) -> None:
        """Re-read every layer's struct (after EngramLayerKernel.set_overrides)."""
        for i, layer in enumerate(self.layers):
            self._c_layers[i] = layer._c[0]

    def stacks(self, per_layer: list[Iterable[OverrideSet]]) -> OverrideStacks:
        """An OverrideStacks for this runtime's layers."""
        return OverrideStacks(self.layers, per_layer)

    @property
    def callback_address(self) -> int:
        return int(ffi.cast("uintptr_t", ffi.addressof(lib, "ek_eval_callback")))

    @property
    def user_data_address(self) -> int:
        return int(ffi.cast("uintptr_t", self._rt))

    @property
    def n_past(self) -> int:
        """Committed positions of sequence 0."""
        return int(self._seqs[0].n_past)

    def seq_n_past(self, seq: int) -> int:
        return int(self._seqs[self._seq(seq)].n_past)

    @property
    def status(self) -> int:
        return int(self._rt.status)

    @property
    def error(self) -> str:
        return ffi.string(self._rt.error).decode("utf-8", "replace")

    @property
    def n_calls(self) -> int:
        return int(self._rt.n_calls)

    @property
    def n_hits(self) -> int:
        return int(self._rt.n_hits)

    @property
    def enabled(self) -> bool:
        return bool(self._rt.enabled)

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self._rt.enabled = 1 if on else 0

    def _seq(self, seq: int) -> int:
        return int_param("seq", seq, lo=0, hi=self.n_seqs - 1)

    def _raise(self, where: str):
        status = int(self._rt.status) or lib.EK_ERR_ARG
        raise EngramRuntimeError(f"{where}: {self.error or STATUS_TEXT.get(STATUS_NAMES.get(status, ''), 'error')}",
                                 status)

    def begin(self, tokens, seq_ids=None) -> None:
        """Announce a batch: raw token ids and (several sequences) the seq id of each; a
        sequence's tokens are one run of consecutive rows."""
        tok = np.ascontiguousarray(tokens, dtype=np.int32)
        if seq_ids is None:
            sid = ffi.NULL
        else:
            sids = np.ascontiguousarray(seq_ids, dtype=np.int32)
            if sids.shape != tok.shape:
                raise ValueError(f"{tok.shape[0]} tokens but {sids.shape[0]} sequence ids")
            sid = ffi.from_buffer("int32_t[]", sids)
        if lib.ek_runtime_begin(self._rt, ffi.from_buffer("int32_t[]", tok), sid, tok.shape[0]):
            self._raise("Engram runtime")

    def commit(self) -> None:
        if lib.ek_runtime_commit(self._rt):
            self._raise("Engram runtime")

    def abort(self) -> None:
        lib.ek_runtime_abort(self._rt)

    def check(self) -> None:
        """Raise if a callback failed."""
        if self._rt.status:
            self._raise("Engram runtime")

    def truncate(self, n: int, seq: int = 0) -> None:
        seq = self._seq(seq)
        if lib.ek_runtime_truncate(self._rt, seq, int_param("n", n, lo=0)):
            self._raise(f"Engram runtime truncate of sequence {seq} to {n} (n_past {self.seq_n_past(seq)})")

    def set_stacks(self, seq: int, stacks: OverrideStacks | None) -> None:
        """Sequence `seq` reads `stacks` (None: each layer's own override sets) from its next batch."""
        seq = self._seq(seq)
        if stacks is not None and not isinstance(stacks, OverrideStacks):
            raise TypeError(f"stacks must be an OverrideStacks or None, got {type(stacks).__name__}")
        status = lib.ek_runtime_set_stacks(self._rt, seq, ffi.NULL if stacks is None else stacks._c)
        if status:
            fail(status, f"Engram runtime: override stacks of sequence {seq}")
        self._stacks[seq] = stacks                 # alive while the sequence reads it

    def reset(self) -> None:
        """Forget every sequence (their stacks stay)."""
        lib.ek_runtime_reset(self._rt)

    def state(self, layer_index: int, seq: int = 0) -> np.ndarray:
        """x rows [n_past, D] of one layer of one sequence (a copy; for tests)."""
        seq = self._seq(seq)
        return self._xs[seq, layer_index, :self.seq_n_past(seq)].copy()

    def close(self) -> None:
        """Stop asking for nodes; the buffers stay alive as long as this object."""
        self._rt.enabled = 0
