"""What a runtime backend is: one sequence of tokens on one model, grown by `eval`, rolled back by
`truncate`, forgotten by `reset`.

`Backend` writes the sequence logic once; llama_backend.LlamaCppBackend (llama.cpp, the Engram in
C) and torch_backend.TorchBackend (PyTorch) subclass it. runtime.session drives either through
this interface:

Sequence (implemented here, once):
  * `tokens` -- the token ids the backend's state holds, oldest first. A subclass sets it to []
    in its constructor; only this class changes it afterwards.
  * `n_past` -- len(tokens).
  * `eval(tokens, all_logits=False)` -- check the new tokens (context.check_new_tokens: not
    empty, they fit in n_ctx, ids in [0, n_vocab)), decode them in chunks of at most `n_batch`,
    append them to `tokens`, and return float32 logits: the last token's [n_vocab], or every new
    token's [len(tokens), n_vocab] with all_logits. Any failure or interrupt (BaseException)
    during decoding resets the sequence before re-raising: the state is then known (empty), never
    half-decoded.
  * `truncate(n)` -- keep the first n positions (n is clamped to [0, n_past]). A backend may roll
    back further than asked (to 0, by resetting); callers read `n_past` afterwards.
  * `reset()` -- forget the whole sequence.

Hooks a backend implements (each sees `tokens` as it was before the call):
  * `_decode(chunk, all_logits, last)` -- run the `chunk` (at most n_batch ids, positions
    n_past.. n_past+len(chunk)-1) and update the backend's own per-sequence state. Return the
    logits rows for the chunk (all of them with all_logits), at least the last row when `last`
    (the final chunk of an eval), or None when no row is wanted. Raise on failure; `eval` resets.
  * `_rollback(n)` -- 0 < n < n_past: drop the state of positions n.. . Return False to refuse
    (the caller then resets); True when done.
  * `_clear()` -- drop all per-sequence state.

Several sequences (the engine, runtime.engine, uses these; written here for a backend of one
sequence, where sequence 0 is the sequence above; llama_backend overrides them for n_seq > 1):
  * `n_seq` -- sequences the backend holds (ids 0..n_seq-1); `n_ctx` is per sequence.
  * `decode_step(entries)` -- entries [(seq, tokens, want_logits)], each sequence once, at most
    n_batch tokens in all: appends each entry's tokens to its sequence in one decode and returns,
    per entry, its last token's float32 logits (a copy) where wanted, else None.
  * `seq_tokens(seq)`, `seq_truncate(seq, n)` -- a sequence's tokens; roll it back to n.
  * `set_seq_stack(seq, stack)` -- the user memory a sequence reads (`make_stack(sidecar,
    overrides)` builds one; None: the backend's own); a change forgets the sequence.
  * `reset_all()` -- forget every sequence.

Attributes and methods a backend provides besides (session uses them; not written here):
  `name`, `n_ctx`, `n_vocab`, `n_batch`, `add_bos`, `chat_template`, `tokenize(text, add_bos)`,
  `detokenize(tokens)`, `is_eog(token)`, `set_overrides(sidecar, overrides)` (swap the user
  memory; resets the sequence) and `close()` (release what the backend holds; safe to call twice).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np

from engram_local.runtime.context import check_new_tokens


def reusable(held: Sequence[int], prompt: Sequence[int]) -> int:
    """How many of `prompt`'s tokens a sequence holding `held` keeps: their common prefix, short of
    the prompt's last token (always decoded again, for the logits after it)."""
    n, limit = 0, min(len(held), len(prompt) - 1)
    while n < limit and held[n] == prompt[n]:
        n += 1
    return n


class Backend(ABC):
    """One sequence on one model: `eval` appends, `truncate` rolls back, `reset` forgets (module
    docstring: the interface and the hooks a backend implements)."""

    name: str
    n_ctx: int
    n_vocab: int
    n_batch: int
    tokens: list[int]          # what the backend's state holds; set to [] by the subclass

    # ---------------------------------------------------------------- the sequence
    @property
    def n_past(self) -> int:
        return len(self.tokens)

    def eval(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append `tokens`; the logits of the last one (float32 [n_vocab], a copy), or of every
        one ([len(tokens), n_vocab]) with all_logits."""
        tokens = check_new_tokens(tokens, len(self.tokens), self.n_ctx, self.n_vocab)
        out = []
        try:
            for i in range(0, len(tokens), self.n_batch):
                chunk = tokens[i:i + self.n_batch]
                rows = self._decode(chunk, all_logits, i + self.n_batch >= len(tokens))
                self.tokens.extend(chunk)
                if rows is not None:
                    out.append(rows)
        except BaseException:
            # A failed or interrupted decode leaves the backend's state unknown: start over.
            self.reset()
            raise
        if all_logits:
            return np.concatenate(out, axis=0)
        return out[-1][-1]

    def truncate(self, n: int) -> None:
        """Keep only the first n positions (or none, where the backend cannot roll back)."""
        n = max(0, min(int(n), len(self.tokens)))
        if n == len(self.tokens):
            return
        if n == 0 or not self._rollback(n):
            self.reset()
            return
        del self.tokens[n:]

    def reset(self) -> None:
        """Forget the sequence."""
        self._clear()
        self.tokens = []

    # ---------------------------------------------------------------- several sequences
    n_seq: int = 1

    def _only_seq0(self, seq: int) -> None:
        if int(seq) != 0:
            raise ValueError(f"the {self.name} backend holds one sequence (0), not {seq}")

    def decode_step(self, entries) -> list:
        """Append each entry's tokens [(seq, tokens, want_logits)] to its sequence; per entry its
        last token's logits where wanted, else None (module docstring)."""
        out = []
        for seq, tokens, want in entries:
            self._only_seq0(seq)
            logits = self.eval(tokens)
            out.append(logits if want else None)
        return out

    def seq_tokens(self, seq: int) -> list[int]:
        self._only_seq0(seq)
        return self.tokens

    def seq_truncate(self, seq: int, n: int) -> None:
        self._only_seq0(seq)
        self.truncate(n)

    def set_seq_stack(self, seq: int, stack) -> None:
        self._only_seq0(seq)
        if stack is not None:
            raise RuntimeError(f"the {self.name} backend reads only its own override stack")

    def make_stack(self, sidecar, overrides):
        raise RuntimeError(f"the {self.name} backend reads only its own override stack")

    def reset_all(self) -> None:
        self.reset()

    # ---------------------------------------------------------------- hooks
    @abstractmethod
    def _decode(self, chunk: list[int], all_logits: bool, last: bool) -> np.ndarray | None:
        """Run `chunk` after the current sequence: its logits rows ([k, n_vocab]), or None."""

    @abstractmethod
    def _rollback(self, n: int) -> bool:
        """Drop the state after position n (0 < n < n_past); False to refuse (then reset)."""

    @abstractmethod
    def _clear(self) -> None:
        """Drop all per-sequence state."""
