"""The one training loop of the package, with the loss passed in (after mlx-lm's tuner/trainer.py).

Every trainer here (the Engram retrofit, the shared skill adapter, the per-user LoRA baseline of
the evaluation) is `train(model, optimizer, batches, loss, steps, ...)`: per step, the next batch,
the learning rate from `schedule`, `loss(model, batch)`, then zero_grad / backward / optional
gradient clipping / optimizer step. What differs between them is the caller's: the batches, the
loss, the schedule, a `stop` test, progress and checkpoint hooks. `collate` pads token rows into
the (ids, labels, mask) tensors the losses read; `save_state` / `load_state` keep the optimizer
and the loop's state between runs so that a resumed run continues where it stopped.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

IGNORE = -100      # label of a position with no loss (torch's cross_entropy default ignore_index)


@dataclass
class TrainState:
    """Where a run stands; saved with the optimizer so that a run can resume."""
    step: int = 0                                     # optimizer steps done
    elapsed: float = 0.0                              # seconds spent in steps, over all resumed runs
    history: list[float] = field(default_factory=list)  # the loss of every evaluated batch, in order


def collate(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad: int):
    """(ids, labels, mask) long tensors (B, T) of `rows` of (token ids, labels of the same length,
    IGNORE where no loss), right-padded to the longest row: ids with `pad` (text.tokens.pad_id),
    labels with IGNORE, mask 1 on real tokens. Right padding: a causal position never attends
    to it."""
    import torch

    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), int(pad), dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (seq, lab) in enumerate(rows):
        if len(lab) != len(seq):
            raise ValueError(f"row {i}: {len(seq)} ids but {len(lab)} labels")
        ids[i, :len(seq)] = torch.tensor(list(seq))
        labels[i, :len(seq)] = torch.tensor(list(lab))
        mask[i, :len(seq)] = 1
    return ids, labels, mask


def token_loss(logits, targets):
    """Mean cross-entropy of (..., V) logits (computed in float32) against the target ids of the
    same leading shape; IGNORE targets carry no loss."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE)


def train(model, optimizer, batches: Iterator, loss: Callable[[Any, Any], Any], steps: int, *,
          state: TrainState | None = None,
          schedule: Callable[[int], float] | None = None,
          clip: float | None = None,
          stop: Callable[[TrainState, dict], bool] | None = None,
          on_step: Callable[[TrainState, dict], None] | None = None,
          checkpoint: Callable[[TrainState], None] | None = None,
          checkpoint_every: int = 0,
          progress: str | None = None) -> TrainState:
    """Run optimizer steps until `state.step == steps` (from `state`: a resumed run) and return
    the state.

    Per step: `batch = next(batches)`; with `schedule`, every param group's lr is its "base_lr"
    (its lr when first seen) times `schedule(step)`; `loss(model, batch)` returns the loss tensor,
    or (loss, info dict); its value goes to `state.history`; `stop(state, info)`, when given, is
    asked before the update and ends the run without it when true (the last evaluated loss stays
    in the history); then zero_grad, backward, gradient-norm clipping to `clip` over the
    optimizer's parameters, the optimizer step, `on_step(state, info)`, and `checkpoint(state)`
    every `checkpoint_every` steps and after the last. `progress` is a tqdm bar's label (loss:
    mean of the last 20; tokens/s where info has "tokens")."""
    import numpy as np
    import torch

    state = state if state is not None else TrainState()
    for g in optimizer.param_groups:
        g.setdefault("base_lr", g["lr"])
    params = [p for g in optimizer.param_groups for p in g["params"]]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=state.step, unit="step", desc=progress, file=sys.stderr)
    t_last = time.perf_counter()
    try:
        while state.step < steps:
            batch = next(batches)
            if schedule is not None:
                scale = schedule(state.step)
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * scale
            out = loss(model, batch)
            value, info = out if isinstance(out, tuple) else (out, {})
            state.history.append(float(value.detach()))
            if stop is not None and stop(state, info):
                break
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            state.step += 1
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            state.elapsed += dt
            if bar is not None:
                post = {"loss": f"{np.mean(state.history[-20:]):.3f}"}
                if "tokens" in info:
                    post["tok_s"] = f"{info['tokens'] / max(dt, 1e-9):.0f}"
                bar.set_postfix(post)
                bar.update(1)
            if on_step is not None:
                on_step(state, info)
            if checkpoint is not None and (state.step == steps or
                                           (checkpoint_every and state.step % checkpoint_every == 0)):
                checkpoint(state)
    finally:
        if bar is not None:
            bar.close()
    return state


def save_state(path: Path, optimizer, state: TrainState, settings: dict) -> None:
    """The optimizer and `state` (with the run's `settings`) to `path`, written atomically."""
    import torch

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"optimizer": optimizer.state_dict(), "step": state.step, "elapsed": state.elapsed,
                "history": state.history, "settings": settings}, tmp)
    tmp.replace(path)


def load_state(path: Path, optimizer, settings: dict) -> TrainState:
    """The state saved in `path` by `save_state`, its optimizer state loaded into `optimizer`;
    ValueError where it was saved with other `settings`."""
    import torch

    path = Path(path)
    saved = torch.load(path, weights_only=False)
    if saved["settings"] != settings:
        raise ValueError(f"{path.parent}: cannot resume with different settings "
                         f"(saved {saved['settings']}, given {settings})")
    optimizer.load_state_dict(saved["optimizer"])
    return TrainState(saved["step"], saved["elapsed"], saved["history"])
