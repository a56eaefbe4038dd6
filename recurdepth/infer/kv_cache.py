"""Key/value cache of a looped model for incremental decoding.

Prelude and coda layers run once per token, so each keeps one `[b, g, L, hn]` buffer. A core layer runs once per
iteration, and a token at iteration i attends to the keys of earlier tokens *at the same iteration*: each core
layer keeps S slots `[S, b, g, L, hn]`, either one per iteration (`share=None`, S = the maximum depth) or
`share=m` slots used as `i mod m` (Huginn's compressed cache: memory independent of depth). With m = depth the
two are the same computation.

A token that stops early (adaptive depth) never writes the slots of the iterations it skipped; `fill` copies its
last keys/values into them, so later tokens read the state it stopped in (Huginn's "latest" lookup).
"""

from __future__ import annotations

from typing import Optional

import torch


class LoopedKVCache:
    """Keys and values `[b, g, L, hn]` per prelude/coda layer and `[S, b, g, L, hn]` per core layer."""

    def __init__(self, batch: int, max_len: int, groups: int, head_dim: int, depth: int, share: Optional[int],
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        if share is not None and share < 1:
            raise ValueError(f"share={share}: use m >= 1 slots, or None for one slot per iteration")
        self.shape = (batch, groups, max_len, head_dim)
        self.share = share
        self.slots = depth if share is None else share
        self.dtype, self.device = dtype, device
        self.length = 0  # positions [0, length) are complete
        self._kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._last: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per core layer: the newest k, v per row

    @property
    def max_len(self) -> int:
        return self.shape[2]

    def slot(self, iteration: int) -> int:
        """The slot iteration `iteration` (0-based) of a core layer reads and writes."""
        return iteration if self.share is None else iteration % self.share

    def _buffers(self, name: str, core: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self._kv:
            shape = ((self.slots,) if core else ()) + self.shape
            self._kv[name] = (torch.zeros(shape, dtype=self.dtype, device=self.device),
                              torch.zeros(shape, dtype=self.dtype, device=self.device))
        return self._kv[name]

    def update(self, name: str, k: torch.Tensor, v: torch.Tensor, start: int, iteration: Optional[int] = None,
               rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k, v [b, g, s, hn]` at positions [start, start + s) (of `iteration`'s slot for a core layer) and
        return the keys and values of positions [0, start + s). With `rows` (batch row indices, a compacted
        batch: only the rows still iterating), `k, v` are those rows' `[len(rows), g, s, hn]`, and so is what
        comes back."""
        core = iteration is not None
        keys, values = self._buffers(name, core)
        if core:
            keys, values = keys[self.slot(iteration)], values[self.slot(iteration)]
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"position {end - 1} is beyond the cache length {self.max_len}")
        if rows is None:
            keys[:, :, start:end], values[:, :, start:end] = k, v
        else:
            keys[rows, :, start:end], values[rows, :, start:end] = k, v
        if core:
            if rows is None:
                self._last[name] = (k, v)
            else:
                last = self._last.get(name)
                if last is None:
                    shape = (self.shape[0], *k.shape[1:])
                    last = (k.new_zeros(shape), v.new_zeros(shape))
                last[0][rows], last[1][rows] = k, v
                self._last[name] = last
        if rows is None:
            return keys[:, :, :end], values[:, :, :end]
        return keys[rows, :, :end], values[rows, :, :end]

    def fill(self, start: int, iterations_done: torch.Tensor) -> None:
        """After the core loop for positions [start, start + s): every core slot a row did not write (it ran
        `iterations_done[row]` iterations) gets that row's last keys and values."""
        slot_ids = torch.arange(self.slots, device=iterations_done.device).view(-1, 1)
        done = iterations_done.view(1, -1)
        unwritten = slot_ids >= done  # [S, b]: per-iteration slots past the exit; shared classes never reached
        if not bool(unwritten.any()):
            self._last.clear()
            return
        mask = unwritten.view(self.slots, -1, 1, 1, 1)
        for name, (k_last, v_last) in self._last.items():
            keys, values = self._kv[name]
            end = start + k_last.shape[2]
            keys[:, :, :, start:end] = torch.where(mask, k_last.unsqueeze(0), keys[:, :, :, start:end])
            values[:, :, :, start:end] = torch.where(mask, v_last.unsqueeze(0), values[:, :, :, start:end])
        self._last.clear()

    def memory_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self._kv.values())
