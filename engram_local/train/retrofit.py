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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engram_local.model.checkpoint import write_meta

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
    from tqdm import tqdm

    out_dir = Path(out_dir)
    torch.manual_seed(s.seed)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    stream = tokenize_corpus(tokenizer, train_file)
    starts = batch_starts(len(stream), s.seq_len, s.batch_size, s.steps, s.seed)
    opt = make_optimizer(model, s)
    step, elapsed, history = 0, 0.0, []
    state_path = out_dir / STATE_FILE
    if resume and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        if state["settings"] != s.__dict__:
            raise ValueError(f"{out_dir}: cannot resume with different settings "
                             f"(saved {state['settings']}, given {s.__dict__})")
        model.load_engram(out_dir)
        opt.load_state_dict(state["optimizer"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        log(f"resuming at step {step}/{s.steps}")
    model.train()
    model.backbone.eval()              # no dropout in the frozen backbone
    bar = tqdm(total=s.steps, initial=step, unit="step", desc="retrofit", file=sys.stderr)
    t_last, tok_since = time.perf_counter(), 0
    while step < s.steps:
        idx = starts[step][:, None] + np.arange(s.seq_len + 1)[None, :]
        batch = torch.from_numpy(stream[idx].astype(np.int64))              # (B, T+1)
        x, y = batch[:, :-1], batch[:, 1:]
        scale = min(1.0, (step + 1) / max(1, s.warmup))
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * scale
        logits = model(x).logits                                            # (B, T, vocab)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        tok_since += x.numel()
        history.append(loss.item())
        now = time.perf_counter()
        elapsed += now - t_last
        bar.set_postfix(loss=f"{history[-1]:.3f}", tok_s=f"{tok_since / (now - t_last):.0f}")
        t_last, tok_since = now, 0
        bar.update(1)
        if step % s.checkpoint_every == 0 or step == s.steps:
            save_checkpoint(model, opt, out_dir, s, step, elapsed, history, backbone_ref)
    bar.close()
    model.eval()
    stats = {"steps": s.steps, "train_tokens": s.steps * s.batch_size * s.seq_len,
             "wall_seconds": round(elapsed, 1), "final_loss_avg20": float(np.mean(history[-20:])),
             "table_rows": {str(l): int(model.layout.rows_per_layer[l]) for l in model.cfg.layer_ids},
             "settings": s.__dict__}
    (out_dir / "retrofit_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def save_checkpoint(model, opt, out_dir: Path, s: RetrofitSettings, step: int, elapsed: float,
                    history: list, backbone_ref: str | None):
    """Weights first, then trainer state, each written atomically: a kill never loses both."""
    model.save_engram(out_dir, table_dtype=torch.float32)
    write_meta(out_dir, {"backbone": backbone_ref})
    tmp = out_dir / (STATE_FILE + ".tmp")
    torch.save({"optimizer": opt.state_dict(), "step": step, "elapsed": elapsed,
                "history": history, "settings": s.__dict__}, tmp)
    tmp.replace(out_dir / STATE_FILE)
