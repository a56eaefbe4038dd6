"""Text generation with the KV-cached decoder: greedy or sampled, fixed depth or per-token KL exit.

    result = generate(model, prompt_ids [b, p], 32, DecodeOptions(depth=8), eod=tokenizer.eod)
    result.tokens [b, n]; result.mean_depth (iterations per generated token)

The prompt minus its last token is prefilled in parallel at the full depth; every generated token then comes
from a single-position step, where adaptive exit applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from recurdepth.infer.decoder import DecodeOptions, decoder_for


@dataclass
class GenerateResult:
    tokens: torch.Tensor  # [b, n] generated ids (after eod: eod)
    depths: torch.Tensor  # [b, n] iterations used for each generated token (0 after eod)
    mean_depth: float  # over generated tokens up to and including each row's eod


def next_tokens(logits: torch.Tensor, temperature: float, top_k: Optional[int], generator) -> torch.Tensor:
    """`logits [b, V]` -> ids `[b]`: argmax at temperature 0, else a sample from softmax(logits / T) (top-k)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, options: DecodeOptions, eod: Optional[int],
             temperature: float = 0.0, top_k: Optional[int] = None, seed: int = 0,
             vocab_size: Optional[int] = None) -> GenerateResult:
    """Continue `prompt [b, p]` (p >= 1) by up to `max_new_tokens` tokens; rows stop at `eod`. Logits of padded
    vocabulary entries (>= `vocab_size`) are never chosen."""
    b, p = prompt.shape
    decoder = decoder_for(model, b, p + max_new_tokens, options)
    generator = torch.Generator().manual_seed(seed)
    if p > 1:
        decoder.step(prompt[:, :-1])
    decoder.depths.clear()
    current = prompt[:, -1:]
    out, depths = [], []
    finished = torch.zeros(b, dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = decoder.step(current)[:, -1].cpu()
        if vocab_size is not None:
            logits[:, vocab_size:] = float("-inf")
        token = next_tokens(logits, temperature, top_k, generator)
        depths.append(torch.where(finished, 0, decoder.depths[-1]))
        if eod is not None:
            token = torch.where(finished, eod, token)
            finished |= token == eod
        out.append(token)
        current = token.view(b, 1)
        if bool(finished.all()):
            break
    tokens, used = torch.stack(out, 1), torch.stack(depths, 1)
    counted = used > 0
    mean = float(used[counted].float().mean()) if bool(counted.any()) else 0.0
    return GenerateResult(tokens=tokens, depths=used, mean_depth=mean)
