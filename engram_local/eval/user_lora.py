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
    import torch

    from engram_local.memory.writer import answer_tokens

    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    start = full[:len(full) - len(plain)] if full[len(full) - len(plain):] == plain else []
    rows = []
    for f in facts:
        p, a = answer_tokens(tok, f.prompt, f.answer)
        rows.append((list(start) + p, a))
    T = max(len(p) + len(a) for p, a in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids = torch.full((len(rows), T), int(pad), dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        seq = p + a
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(p):len(seq)] = torch.tensor(a)
        mask[i, :len(seq)] = 1
    return ids, labels, mask


def train_user_lora(em, tok, facts, settings: UserLoRASettings | None = None, progress=None):
    """Attach a fresh LoRA to em.backbone and fit it to `facts` (left attached: save it, then
    `lora.remove_lora`). Returns (steps, first loss, last loss, converged)."""
    import torch
    import torch.nn.functional as F

    from engram_local.model import lora

    s = settings or UserLoRASettings()
    torch.manual_seed(s.seed)
    lora.add_lora(em.backbone, s.rank, s.alpha, s.targets, seed=s.seed)
    params = lora.lora_parameters(em.backbone)
    opt = torch.optim.Adam(params, lr=s.lr)
    ids, labels, mask = fact_batch(tok, facts)
    tgt = labels[:, 1:].reshape(-1)
    sel = tgt >= 0
    losses, converged, steps = [], False, 0
    for _ in range(s.max_steps + 1):
        logits = em(ids, attention_mask=mask).logits[:, :-1].reshape(-1, em.backbone.config.vocab_size)
        logits = logits[sel].float()
        gold = tgt[sel]
        loss = F.cross_entropy(logits, gold)
        losses.append(float(loss.detach()))
        with torch.no_grad():
            other = logits.scatter(1, gold[:, None], float("-inf")).max(1).values
            margin = float((logits.gather(1, gold[:, None])[:, 0] - other).min())
        if margin >= s.margin:
            converged = True
            break
        if steps == s.max_steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        if progress is not None:
            progress(steps, losses[-1], margin)
    return steps, losses[0], losses[-1], converged


def write_gguf_adapter(peft_dir: Path, backbone_gguf: Path, dest: Path) -> None:
    """The PEFT LoRA in `peft_dir` as a llama.cpp adapter GGUF for the backbone `backbone_gguf`."""
    from engram_local.convert import adapter as adapter_io
    from engram_local.convert import registry
    from engram_local.formats.gguf_io import scan_gguf

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
