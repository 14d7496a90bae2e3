"""Prompts longer than CLIP's 77-token window: encode 75-token chunks and concatenate the embeddings
(as compel / sd_embed do), instead of diffusers' silent truncation.

Mirrors StableDiffusionXLPipeline.encode_prompt per chunk: penultimate hidden state (or clip_skip), the
pooled embedding from the first chunk of the last encoder, zeroed negatives when the pipeline zeroes them.
"""

import math
from typing import Any

import torch

CHUNK = 75  # tokens between BOS and EOS


def token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)


def needs_chunks(pipe: Any, texts: list[list[str]]) -> int:
    """How many 77-token windows the longest text needs, over every tokenizer the pipe has."""
    tokenizers = [t for t in (getattr(pipe, "tokenizer", None), pipe.tokenizer_2) if t is not None]
    longest = max(len(token_ids(tok, t)) for tok in tokenizers for group in texts for t in group)
    return max(1, math.ceil(longest / CHUNK))


@torch.no_grad()
def _encode(tokenizer: Any, encoder: Any, texts: list[str], chunks: int, clip_skip: int | None,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    all_ids = [token_ids(tokenizer, t) for t in texts]
    hidden, pooled = [], None
    for k in range(chunks):
        rows = []
        for ids in all_ids:
            row = [bos, *ids[k * CHUNK:(k + 1) * CHUNK], eos]
            rows.append(row + [pad] * (CHUNK + 2 - len(row)))
        out = encoder(torch.tensor(rows, device=device), output_hidden_states=True)
        if pooled is None:
            pooled = out[0]
        layer = -2 if clip_skip is None else -(clip_skip + 2)
        hidden.append(out.hidden_states[layer])
    assert pooled is not None
    return torch.cat(hidden, dim=1), pooled


def long_prompt_embeds(pipe: Any, prompts: list[str], prompts_2: list[str], negatives: list[str] | None,
                       negatives_2: list[str] | None, chunks: int, clip_skip: int | None) -> dict[str, Any]:
    """Keyword arguments (prompt_embeds, negative_..., pooled_...) that replace the prompt texts."""
    device = pipe._execution_device
    dtype = pipe.text_encoder_2.dtype
    pairs = [(pipe.tokenizer, pipe.text_encoder, prompts, negatives)] if getattr(pipe, "tokenizer", None) else []
    pairs.append((pipe.tokenizer_2, pipe.text_encoder_2, prompts_2, negatives_2))
    pos, neg = [], []
    pooled = neg_pooled = None
    zero_negative = negatives is None and pipe.config.force_zeros_for_empty_prompt
    for tokenizer, encoder, texts, neg_texts in pairs:
        h, p = _encode(tokenizer, encoder, texts, chunks, clip_skip, device)
        pos.append(h)
        pooled = p
        if not zero_negative:
            nh, np_ = _encode(tokenizer, encoder, neg_texts or [""] * len(texts), chunks, clip_skip, device)
            neg.append(nh)
            neg_pooled = np_
    prompt_embeds = torch.cat(pos, dim=-1).to(dtype)
    assert pooled is not None  # the last encoder always runs
    if zero_negative:
        negative_embeds = torch.zeros_like(prompt_embeds)
        neg_pooled = torch.zeros_like(pooled)
    else:
        negative_embeds = torch.cat(neg, dim=-1).to(dtype)
    return {
        "prompt_embeds": prompt_embeds,
        "negative_prompt_embeds": negative_embeds,
        "pooled_prompt_embeds": pooled.to(dtype),  # type: ignore[union-attr]
        "negative_pooled_prompt_embeds": neg_pooled.to(dtype),  # type: ignore[union-attr]
    }
