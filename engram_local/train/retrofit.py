"""Retrofit: graft Engram layers onto a frozen pretrained decoder and train only the Engram.

Recipe (DeepSeek's Engram settings, engram-architecture.md §6): Adam; the tables' learning rate
is 5x the rest and they get no weight decay; the conv starts at zero and the tables start at
zero, so the untrained model is exactly the backbone. Batches are random windows of the
tokenized corpus drawn from a seeded generator, so a run is deterministic for a seed (on the
same machine and thread count) and a resumed run continues the same sequence of batches.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engram_local.model.checkpoint import write_meta
from engram_local.train.trainer import TrainState, load_state, save_state, token_loss, train

STATE_FILE = "trainer_state.pt"


@dataclass
class RetrofitSettings:
    steps: int = 600                 # optimizer steps
    batch_size: int = 8              # windows per step
    seq_len: int = 256               # tokens per window
    lr: float = 2e-3                 # W_K, W_V, norms, conv
    table_lr_mult: float = 5.0       # tables learn 5x faster (DeepSeek)
    weight_decay: float = 0.0        # on non-table parameters; tables never decay
    seed: int = 0                    # data order and initialisation
    checkpoint_every: int = 100      # steps between checkpoints
    warmup: int = 20                 # linear learning-rate warm-up steps


def tokenize_corpus(tokenizer, path: Path) -> np.ndarray:
    """The whole text file as one int32 stream of raw token ids."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path}: the corpus file is empty")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids, dtype=np.int32)


def batch_starts(n_tokens: int, seq_len: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """(steps, batch) window starts: shuffled non-overlapping windows, reshuffled each epoch."""
    n_windows = (n_tokens - 1) // seq_len
    if n_windows < batch_size:
        raise ValueError(f"corpus too small: {n_tokens} tokens give {n_windows} windows of {seq_len}, "
                         f"fewer than one batch of {batch_size}")
    rng = np.random.default_rng(seed)
    need = steps * batch_size
    order = np.concatenate([rng.permutation(n_windows) for _ in range(math.ceil(need / n_windows))])
    return (order[:need] * seq_len).reshape(steps, batch_size)


def make_optimizer(model, s: RetrofitSettings) -> torch.optim.Optimizer:
    tables = [p for n, p in model.engram.named_parameters() if n.endswith("table")]
    rest = [p for n, p in model.engram.named_parameters() if not n.endswith("table")]
    return torch.optim.Adam([
        {"params": tables, "lr": s.lr * s.table_lr_mult, "weight_decay": 0.0, "base_lr": s.lr * s.table_lr_mult},
        {"params": rest, "lr": s.lr, "weight_decay": s.weight_decay, "base_lr": s.lr},
    ])


def retrofit(model, tokenizer, train_file: Path, out_dir: Path, s: RetrofitSettings,
             backbone_ref: str | None = None, resume: bool = False, valid_file: Path | None = None,
             log=print) -> dict:
    """Train `model.engram` on `train_file`; checkpoints go to out_dir. Returns run statistics."""
    out_dir = Path(out_dir)
    torch.manual_seed(s.seed)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    stream = tokenize_corpus(tokenizer, train_file)
    starts = batch_starts(len(stream), s.seq_len, s.batch_size, s.steps, s.seed)
    opt = make_optimizer(model, s)
    state = TrainState()
    state_path = out_dir / STATE_FILE
    if resume and state_path.is_file():
        state = load_state(state_path, opt, s.__dict__)
        model.load_engram(out_dir)
        log(f"resuming at step {state.step}/{s.steps}")
    model.train()
    model.backbone.eval()              # no dropout in the frozen backbone
    window = np.arange(s.seq_len + 1)[None, :]
    # batch k is the windows starting at starts[k]: a resumed run goes on with the same batches
    batches = (torch.from_numpy(stream[starts[k][:, None] + window].astype(np.int64))   # (B, T+1)
               for k in range(state.step, s.steps))
    state = train(model, opt, batches, next_token_loss, s.steps, state=state,
                  schedule=lambda step: min(1.0, (step + 1) / max(1, s.warmup)),
                  checkpoint=lambda st: save_checkpoint(model, opt, out_dir, s, st, backbone_ref),
                  checkpoint_every=s.checkpoint_every, progress="retrofit")
    model.eval()
    stats = {"steps": s.steps, "train_tokens": s.steps * s.batch_size * s.seq_len,
             "wall_seconds": round(state.elapsed, 1), "final_loss_avg20": float(np.mean(state.history[-20:])),
             "table_rows": {str(l): int(model.layout.rows_per_layer[l]) for l in model.cfg.layer_ids},
             "settings": s.__dict__}
    (out_dir / "retrofit_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def next_token_loss(model, batch):
    """Cross-entropy of predicting batch[:, 1:] from batch[:, :-1] (a (B, T+1) window batch)."""
    x, y = batch[:, :-1], batch[:, 1:]
    return token_loss(model(x).logits, y), {"tokens": x.numel()}


def save_checkpoint(model, opt, out_dir: Path, s: RetrofitSettings, state: TrainState,
                    backbone_ref: str | None):
    """Weights first, then trainer state, each written atomically: a kill never loses both."""
    model.save_engram(out_dir, table_dtype=torch.float32)
    write_meta(out_dir, {"backbone": backbone_ref})
    save_state(out_dir / STATE_FILE, opt, state, s.__dict__)
