"""A model with every weight moved off its initialisation (norms by 0.3, matrices by `scale`), saved as a
recurdepth checkpoint: what the export tests export, so that no weight's mapping is hidden by an identity."""

from __future__ import annotations

import torch


def perturbed_checkpoint(cfg, path, scale: float, vocab: int = 264) -> None:
    from recurdepth.export.cli import write_checkpoint
    from recurdepth.model.build import build_model

    model = build_model(cfg, vocab)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else scale))
    write_checkpoint(cfg, model, path, vocab)
