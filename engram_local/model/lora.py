"""Low-rank adapters (LoRA) on a backbone's linear projections, saved in PEFT's file layout.

    y = W x + (alpha / r) * B (A x)       A (r, in) Kaiming-uniform, B (out, r) zero at start

One small implementation serves the shared skill adapter (`train-skill`, rank 16 on q/k/v) and
the per-user baseline of the head-to-head evaluation (rank 64). The files are what PEFT writes
(`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<module>.lora_{A,B}.weight`), so `convert` turns them into a llama.cpp
adapter GGUF and PEFT itself can load them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj")   # the paper's shared and per-user LoRA (§5, §6)
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.base = base
        self.r, self.alpha = int(r), float(alpha)
        self.scale = self.alpha / self.r
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=dt))
        # PEFT's init: kaiming_uniform_(a=sqrt(5)) on A, i.e. U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(base.in_features)
        with torch.no_grad():
            a = torch.rand(r, base.in_features, generator=generator) * (2 * bound) - bound
            self.lora_A.copy_(a.to(dev, dt))
        self.enabled = True

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        return y + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale


def _targets(model: nn.Module, targets: Iterable[str]):
    targets = tuple(targets)
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if child_name in targets and isinstance(child, nn.Linear):
                yield (f"{name}.{child_name}" if name else child_name), module, child_name, child


def add_lora(model: nn.Module, r: int, alpha: float, targets: Iterable[str] = DEFAULT_TARGETS,
             seed: int = 0) -> list[str]:
    """Wrap every nn.Linear named in `targets` with a LoRALinear; returns the wrapped module names.

    The rest of the model is frozen; only the adapters' A and B train.
    """
    if lora_modules(model):
        raise ValueError("this model already carries a LoRA adapter; remove_lora() it first")
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    names = []
    for full, parent, child_name, child in list(_targets(model, targets)):
        setattr(parent, child_name, LoRALinear(child, r, alpha, g))
        names.append(full)
    if not names:
        raise ValueError(f"no linear layer named {' / '.join(targets)} in {type(model).__name__}")
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    for m in lora_modules(model).values():
        m.enabled = enabled


def merge_into(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The LoRA merge rule of engram-local, the one place it is computed: W <- W + scale * B A.

    weight (out, in), a (r, in), b (out, r), in place on `weight` (returned). B A and the sum are
    formed in float64 and rounded once to weight's dtype, so every caller gets the same bits for
    the same inputs: `remove_lora(merge=True)`, the torch loader's merge of an extra adapter
    (runtime.loader.merge_lora) and the folding of the skill adapter into backbone-skill.gguf
    (convert.adapter.merge_lora_into_backbone, before it re-quantizes).
    """
    with torch.no_grad():
        a64, b64 = a.detach().to(weight.device, torch.float64), b.detach().to(weight.device, torch.float64)
        merged = weight.detach().to(torch.float64) + float(scale) * (b64 @ a64)
        weight.copy_(merged.to(weight.dtype))
    return weight


def remove_lora(model: nn.Module, merge: bool = False) -> None:
    """Unwrap every LoRALinear (folding scale * B A into W first when merge=True: merge_into)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                if merge:
                    merge_into(child.base.weight, child.lora_A, child.lora_B, child.scale)
                setattr(module, child_name, child.base)


def save_peft(model: nn.Module, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the model's adapters as a PEFT LoRA directory (atomically: tmp files + rename)."""
    from safetensors.torch import save_file

    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model carries no LoRA adapter to save")
    ranks = {m.r for m in mods.values()}
    alphas = {m.alpha for m in mods.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"mixed ranks {sorted(ranks)} / alphas {sorted(alphas)}: one adapter has one of each")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, m in mods.items():
        state[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().float().cpu().contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.detach().float().cpu().contiguous()
    targets = sorted({n.rsplit(".", 1)[-1] for n in mods})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": ranks.pop(), "lora_alpha": alphas.pop(),
           "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
           "use_dora": False, "fan_in_fan_out": False, "base_model_name_or_path": None,
           **(extra or {})}
    tmp_w, tmp_c = directory / (PEFT_WEIGHTS + ".tmp"), directory / (PEFT_CONFIG + ".tmp")
    save_file(state, str(tmp_w))
    tmp_c.write_text(json.dumps(cfg, indent=1, sort_keys=True) + "\n")
    os.replace(tmp_w, directory / PEFT_WEIGHTS)
    os.replace(tmp_c, directory / PEFT_CONFIG)
    return directory


def load_peft(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Attach the PEFT LoRA in `directory` to `model` (as trainable LoRALinear modules)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path = directory / PEFT_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory}: no {PEFT_CONFIG} (not a LoRA adapter directory)")
    cfg = json.loads(cfg_path.read_text())
    state = load_file(str(directory / PEFT_WEIGHTS))
    names = add_lora(model, int(cfg["r"]), float(cfg["lora_alpha"]), cfg["target_modules"])
    mods = lora_modules(model)
    expected = {f"base_model.model.{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        remove_lora(model)
        raise ValueError(f"{directory}: adapter does not fit this model (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for n, m in mods.items():
            for ab, p in (("A", m.lora_A), ("B", m.lora_B)):
                t = state[f"base_model.model.{n}.lora_{ab}.weight"]
                if t.shape != p.shape:
                    remove_lora(model)
                    raise ValueError(f"{directory}: {n}.lora_{ab} is {list(t.shape)}, expected {list(p.shape)}")
                p.copy_(t.to(p.dtype))
    return names


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in lora_parameters(model))
