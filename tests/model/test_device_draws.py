"""s_0 and Quiet-STaR's Gumbel noise are drawn on the model's device: on the meta device (Huginn-sized shapes)
nothing of the draw's size is allocated on the host."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from recurdepth.config import load_config


class HostAllocations(TorchDispatchMode):
    """The element counts of every CPU tensor an op returns while active."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.sizes += [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
        return out


def test_initial_state_is_drawn_on_the_models_device(megatron_single_process):
    from recurdepth.model.build import build_model

    cfg = load_config(None, ["model.hidden_size=32", "model.num_heads=4", "model.initial_state=trunc_normal"])
    model = build_model(cfg, 264)
    s, h = 4096, 5280  # one Huginn-3.5B sample: 2.45 s on the host CPU generator when drawn there
    e = torch.empty(s, 2, h, device="meta", dtype=torch.bfloat16)
    with HostAllocations() as seen:
        state = model.initial_state(e, sample_ids=[3, 4])
    assert state.device.type == "meta" and state.shape == (s, 2, h) and state.dtype == torch.bfloat16
    assert max(seen.sizes, default=0) < s * h // 1000, seen.sizes
    with HostAllocations() as seen:  # the control: the same draw on the CPU is seen
        model.initial_state(torch.empty(64, 2, 32), sample_ids=[3, 4])
    assert max(seen.sizes) >= 64 * 32


def test_gumbel_noise_is_drawn_on_the_device():
    from recurdepth.objectives.quiet_star import GumbelNoise

    s, vocab = 1024, 32768
    noise = GumbelNoise(seed=0, sample_ids=[0, 1, 2, 3], passes=2, s=s, vocab=vocab, dtype=torch.float32,
                        device="meta")
    with HostAllocations() as seen:
        draw = noise.next()
    assert draw.device.type == "meta" and draw.shape == (8, s, vocab) and draw.dtype == torch.float32
    assert max(seen.sizes, default=0) < s * vocab // 1000, seen.sizes
