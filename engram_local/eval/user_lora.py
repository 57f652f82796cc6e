"""The per-user LoRA baseline of the head-to-head evaluation (conditions B and D).

The paper's recipe (user-as-engram-method.md §6): rank 64, alpha 128 on q/k/v of every layer,
Adam lr 5e-4, batch 1 (one random fact per step), single-token gold cross-entropy at the last
prompt position, 1,500 steps per user. On a 2-core CPU 1,500 steps x 10 users is hours, so the
same adapter is trained here with the same rank, targets, optimizer and learning rate on a
full batch (every fact of the user in each step), cross-entropy on every answer token (the
whole answer, not only its first token: the runtime generates whole answers), and an early stop
once every answer token leads the runner-up by `margin` logits (the writer's own recall
criterion, engram_local.memory.writer.FitSettings.margin), at most `max_steps` steps.

The adapter is saved as a PEFT directory (torch: bits per byte) and as a llama.cpp LoRA adapter
GGUF (generation), cached in a directory keyed by the facts, the settings and the model.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PEFT_SUBDIR = "peft"
GGUF_NAME = "adapter.gguf"
META_NAME = "meta.json"


@dataclass
class UserLoRASettings:
    rank: int = 64                          # the paper's per-user LoRA: r64, alpha 128
    alpha: float = 128.0
    targets: tuple = ("q_proj", "k_proj", "v_proj")
    lr: float = 5e-4                        # Adam, the paper's learning rate
    max_steps: int = 300                    # full-batch steps at most
    margin: float = 2.0                     # stop once every answer token leads by this many logits
    seed: int = 0


@dataclass
class UserLoRA:
    peft_dir: Path
    gguf: Path
    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    converged: bool
    cached: bool = False

    @property
    def bytes(self) -> int:
        return self.gguf.stat().st_size

    def as_dict(self) -> dict:
        return {"gguf": str(self.gguf), "bytes": self.bytes, "steps": self.steps,
                "seconds": round(self.seconds, 2), "first_loss": self.first_loss,
                "last_loss": self.last_loss, "converged": self.converged, "cached": self.cached}


def fact_batch(tok, facts):
    """(ids, labels, mask) tensors: one right-padded row per fact, `prompt + answer` with the
    tokenizer's own sequence start (BOS where it adds one), labels on the answer tokens only."""
    from engram_local.memory.writer import answer_tokens
    from engram_local.text.tokens import pad_id, sequence_start
    from engram_local.train.trainer import IGNORE, collate

    start = sequence_start(tok)
    rows = []
    for f in facts:
        p, a = answer_tokens(tok, f.prompt, f.answer)
        p = start + p
        rows.append((p + a, [IGNORE] * len(p) + a))
    return collate(rows, pad_id(tok))


def answer_loss(em, batch):
    """Cross-entropy on the answer tokens of a `fact_batch`, and (info) the smallest lead of a
    gold answer token over the runner-up, in logits."""
    import torch
    import torch.nn.functional as F

    ids, labels, mask = batch
    tgt = labels[:, 1:].reshape(-1)
    sel = tgt >= 0
    logits = em(ids, attention_mask=mask).logits[:, :-1].reshape(-1, em.backbone.config.vocab_size)
    logits = logits[sel].float()
    gold = tgt[sel]
    loss = F.cross_entropy(logits, gold)
    with torch.no_grad():
        other = logits.scatter(1, gold[:, None], float("-inf")).max(1).values
        margin = float((logits.gather(1, gold[:, None])[:, 0] - other).min())
    return loss, {"margin": margin}


def train_user_lora(em, tok, facts, settings: UserLoRASettings | None = None, progress=None):
    """Attach a fresh LoRA to em.backbone and fit it to `facts` (left attached: save it, then
    `lora.remove_lora`). Returns (steps, first loss, last loss, converged)."""
    import itertools

    import torch

    from engram_local.model import lora
    from engram_local.train.trainer import train

    s = settings or UserLoRASettings()
    torch.manual_seed(s.seed)
    lora.add_lora(em.backbone, s.rank, s.alpha, s.targets, seed=s.seed)
    opt = torch.optim.Adam(lora.lora_parameters(em.backbone), lr=s.lr)
    margin = float("-inf")

    def stop(state, info):              # asked after each loss, before its update
        nonlocal margin
        margin = info["margin"]
        return margin >= s.margin or state.step == s.max_steps

    def on_step(state, info):
        if progress is not None:
            progress(state.step, state.history[-1], info["margin"])

    # max_steps updates, and the loss after the last one: max_steps + 1 evaluations of the batch
    state = train(em, opt, itertools.repeat(fact_batch(tok, facts)), answer_loss, s.max_steps + 1,
                  stop=stop, on_step=on_step)
    return state.step, state.history[0], state.history[-1], margin >= s.margin


def write_gguf_adapter(peft_dir: Path, backbone_gguf: Path, dest: Path) -> None:
    """The PEFT LoRA in `peft_dir` as a llama.cpp adapter GGUF for the backbone `backbone_gguf`."""
    from engram_local.convert import adapter as adapter_io
    from engram_local.convert import registry
    from engram_local.formats.header import scan_gguf

    header = scan_gguf(backbone_gguf)
    arch = registry.for_gguf(header.architecture or "")
    adapter_io.write_lora_adapter(Path(peft_dir), arch, arch.config_from_gguf(header.fields), Path(dest))


def user_lora(em, tok, facts, backbone_gguf: Path, directory: Path, model_key: str,
              settings: UserLoRASettings | None = None, progress=None) -> UserLoRA:
    """The user's LoRA in `directory` (PEFT + GGUF), trained on `em` unless a cached one was made
    from the same facts, settings and model (`model_key`). em.backbone carries no LoRA after."""
    from engram_local.model import lora

    s = settings or UserLoRASettings()
    directory = Path(directory)
    peft, gguf, meta_path = directory / PEFT_SUBDIR, directory / GGUF_NAME, directory / META_NAME
    want = {"facts": [[f.id, f.prompt, f.answer] for f in facts],
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()},
            "model": model_key}
    if meta_path.is_file() and gguf.is_file() and (peft / lora.PEFT_WEIGHTS).is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
        if meta.get("key") == want:
            return UserLoRA(peft, gguf, meta["steps"], meta["seconds"], meta["first_loss"],
                            meta["last_loss"], meta["converged"], cached=True)
    directory.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        steps, first, last, converged = train_user_lora(em, tok, facts, s, progress)
        lora.save_peft(em.backbone, peft)
    finally:
        lora.remove_lora(em.backbone)
    write_gguf_adapter(peft, backbone_gguf, gguf)
    seconds = time.perf_counter() - t0
    meta_path.write_text(json.dumps({"key": want, "steps": steps, "seconds": seconds, "first_loss": first,
                                     "last_loss": last, "converged": converged}, indent=1) + "\n")
    return UserLoRA(peft, gguf, steps, seconds, first, last, converged)
