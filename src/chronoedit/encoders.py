"""Conditioning from text (UMT5) and from the input image (CLIP vision), as the reference computes them."""

from __future__ import annotations

import html

import PIL.Image
import regex as re
import torch

from .errors import UserError

TEXT_TOKENS = 512


def clean_prompt(text: str) -> str:
    """ftfy repair, double html-unescape, collapse whitespace (the reference's prompt_clean)."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def encode_text(
    tokenizer: object,
    text_encoder: torch.nn.Module,
    prompts: list[str],
    max_sequence_length: int = TEXT_TOKENS,
) -> torch.Tensor:
    """prompts -> [len(prompts), 512, d_model]: real tokens (EOS included) then exact zeros.

    The encoder runs on the device it sits on; the result stays there.
    """
    if not 1 <= max_sequence_length <= TEXT_TOKENS:
        raise UserError(
            f"{{max_sequence_length}} must be between 1 and {TEXT_TOKENS}, got {max_sequence_length}",
            field="max_sequence_length",
        )
    tokens = tokenizer(
        [clean_prompt(p) for p in prompts],
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    hidden = text_encoder(ids, mask).last_hidden_state  # [B, max_len, d_model]
    lengths = mask.gt(0).sum(dim=1)
    out = hidden.new_zeros(len(prompts), TEXT_TOKENS, hidden.shape[-1])  # zero pads, as the model was trained
    for row, length in enumerate(lengths.tolist()):
        out[row, :length] = hidden[row, :length]
    return out


def encode_image(
    image_processor: object, image_encoder: torch.nn.Module, images: list[PIL.Image.Image]
) -> torch.Tensor:
    """CLIP penultimate hidden states of the (unresized) input image(s): [N, 257, hidden]."""
    param = next(image_encoder.parameters())
    pixels = image_processor(images=images, return_tensors="pt").pixel_values.to(param.device, param.dtype)
    return image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
