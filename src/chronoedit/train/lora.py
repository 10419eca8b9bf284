"""The trainable part: a fresh peft LoRA on the transformer (or every weight, for full fine-tuning), and the LoRA's
weights taken back out for saving and resuming.

Targets are given in NVIDIA's short (original Wan) names or ours. The default, ``q k v o ffn.0 ffn.2``, is NVIDIA's:
q/k/v/o of **both** the self-attention (attn1) and the cross-attention (attn2), and both FFN linears. The image K/V
projections of the cross-attention (``k_img``/``v_img`` = ``add_k_proj``/``add_v_proj``) are not among them, as in
NVIDIA's training (their names do not match ``k``/``v``); name them to train them too.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..lora import LoraFile, LoraModule, read_lora

ADAPTER = "default"
SHORT_TARGETS = {
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "o": "to_out.0",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "k_img": "add_k_proj",
    "v_img": "add_v_proj",
}


def target_modules(transformer: nn.Module, targets: list[str]) -> list[str]:
    """Our full module names (``blocks.0.attn1.to_q`` ...) for ``targets``; UserError for one that matches nothing."""
    names = [n for n, m in transformer.named_modules() if isinstance(m, nn.Linear)]
    found: list[str] = []
    for target in targets:
        ours = SHORT_TARGETS.get(target, target)
        matched = [n for n in names if n == ours or n.endswith("." + ours)]
        if not matched:
            raise UserError(f"lora_targets: {target!r} matches no Linear layer of the transformer", "lora_targets")
        found.extend(m for m in matched if m not in found)
    return sorted(found)


def add_lora(transformer: nn.Module, targets: list[str], rank: int, alpha: float) -> list[str]:
    """Inject a trainable LoRA (lora_B = 0: the model starts unchanged; adapters in float32) on ``targets``;
    everything else frozen. Returns the LoRA'd module names."""
    from peft import LoraConfig, inject_adapter_in_model

    modules = target_modules(transformer, targets)
    transformer.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, init_lora_weights=True)
    inject_adapter_in_model(config, transformer, adapter_name=ADAPTER)
    for name, param in transformer.named_parameters():
        if ".lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
    return modules


def lora_modules(transformer: nn.Module) -> dict[str, LoraModule]:
    """The trained LoRA in the library's form (our module names), ready for :func:`chronoedit.lora.save_lora`."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, layer in transformer.named_modules():
        if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A:
            out[name] = LoraModule(
                down=layer.lora_A[ADAPTER].weight.detach().float().cpu().clone(),
                up=layer.lora_B[ADAPTER].weight.detach().float().cpu().clone(),
                alpha=float(layer.lora_alpha[ADAPTER]),
            )
    return out


def lora_modules_from_state(state: Mapping[str, torch.Tensor], alpha: float) -> dict[str, LoraModule]:
    """The same from a full state dict (``accelerator.get_state_dict``: gathered under ZeRO-3 / FSDP)."""
    suffix = f".lora_A.{ADAPTER}.weight"
    out = {}
    for key, down in state.items():
        if key.endswith(suffix):
            name = key[: -len(suffix)]
            up = state[f"{name}.lora_B.{ADAPTER}.weight"]
            out[name] = LoraModule(down=down.detach().float().cpu(), up=up.detach().float().cpu(), alpha=alpha)
    if not out:
        raise ValueError("the trained model holds no LoRA weights")
    return out


def load_lora_weights_(transformer: nn.Module, source: Path | LoraFile) -> None:
    """Copy a saved LoRA (a file written by :func:`lora_modules` + ``save_lora``, or that file read) into the
    injected layers."""
    lora = source if isinstance(source, LoraFile) else read_lora(source)
    with torch.no_grad():
        for name, module in lora.modules.items():
            layer = transformer.get_submodule(name)
            layer.lora_A[ADAPTER].weight.copy_(module.down)
            layer.lora_B[ADAPTER].weight.copy_(module.up)


def trainable_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    return [p for p in transformer.parameters() if p.requires_grad]


def count(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)
