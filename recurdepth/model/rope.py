"""RoPE inverse frequencies, with the frequency scalings of imported Hugging Face models.

    unscaled  f_i = base^(-2i/d),  i = 0 .. d/2 - 1
    linear    f_i / factor                                    (HF rope_type "linear")
    llama3    with wavelength w_i = 2 pi / f_i and L = original_max_positions (HF rope_type "llama3"):
              w_i < L / high  -> f_i                            (high frequencies kept)
              w_i > L / low   -> f_i / factor                   (low frequencies stretched)
              otherwise       -> (1 - a) f_i / factor + a f_i,  a = (L / w_i - low) / (high - low)

Computed in float64 (exact angles at any sequence length); callers cast where they need to."""

from __future__ import annotations

import math

import torch


def rope_inv_freq(model_cfg, head_dim: int) -> torch.Tensor:
    """`[head_dim / 2]` float64 inverse frequencies for `model_cfg` (a `ModelConfig`)."""
    m = model_cfg
    inv = 1.0 / m.rotary_base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if m.rope_scaling == "linear":
        return inv / m.rope_scaling_factor
    if m.rope_scaling == "llama3":
        factor, low, high = m.rope_scaling_factor, m.rope_low_freq_factor, m.rope_high_freq_factor
        context = float(m.rope_original_max_positions)
        wavelen = 2 * math.pi / inv
        smooth = (context / wavelen - low) / (high - low)
        medium = (1 - smooth) * inv / factor + smooth * inv
        return torch.where(wavelen < context / high, inv, torch.where(wavelen > context / low, inv / factor, medium))
    return inv
