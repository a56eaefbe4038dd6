"""Deterministic seeds derived from integers (seed, stream, index, ...), independent of rank and layout."""

import numpy as np


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys by numpy's SeedSequence (stable across Python versions)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFF_FFFF_FFFF_FFFF for k in keys]).generate_state(1, np.uint64)[0]
               & 0x7FFF_FFFF_FFFF_FFFF)


def device_generator(device, seed: int):
    """A `torch.Generator` on `device` seeded with `seed`, so that draws happen where the tensors live (no host
    tensor of the draw's size, no copy); None on the meta device, which has no generator and draws nothing."""
    import torch

    device = torch.device(device)
    return None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)
