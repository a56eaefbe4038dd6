"""The naive pipeline split of a looped model, kept as a baseline for `recurdepth bench pipeline`.

Stage 0 holds embedding, prelude and the *whole* core and runs all r iterations itself; the last stage holds
coda and head. Each micro-batch makes one trip, so while stage 0 loops the other stages wait: the bubble is
that of a two-stage split with very unequal stages. `LoopedPipelineSchedule` drives it with one trip.
"""

from __future__ import annotations

import torch

from recurdepth.model.depth import BackpropWindow
from recurdepth.parallel.pipeline import LoopedPipelineSchedule


class _AllIterationsOnFirstStage:
    """`LoopedStage` view of the model in which stage 0's single chunk is the whole truncated-backprop loop."""

    def __init__(self, model):
        self.model = model
        self.window = BackpropWindow(1, 1)

    is_first = property(lambda self: self.model.is_first)
    is_last = property(lambda self: self.model.is_last)

    def embed(self, tokens):
        return self.model.embed(tokens)

    def initial_state(self, e, sample_ids):
        return self.model.initial_state(e, sample_ids)

    def core_chunk(self, x, e, it=None):  # the schedule's one trip (`it`) is the whole window here
        if not self.model.is_first:
            return x.clone()
        with torch.set_grad_enabled(torch.is_grad_enabled() and (it is None or it.grad)):
            return self.model.recur(x, e, self.window)

    def head(self, x, labels):
        return self.model.head(x, labels)


class NaivePipelineSchedule:
    """Same `run` interface as `LoopedPipelineSchedule`; all r iterations on the first stage per trip."""

    def __init__(self, model, pp_group, tensor_shape, dtype, device, record_timeline: bool = False,
                 multi_pass_in_flight: int = 0):
        self.stage = _AllIterationsOnFirstStage(model)
        self.inner = LoopedPipelineSchedule(self.stage, pp_group, tensor_shape, dtype, device, record_timeline,
                                            multi_pass_in_flight)

    def run(self, micro_batches, window: BackpropWindow, loss_fn, readouts=None):
        if readouts is not None:
            raise ValueError("the naive split runs every iteration on the first stage: per-iteration readouts need "
                             "parallel.pipeline_split=looped")
        self.stage.window = window
        return self.inner.run(micro_batches, BackpropWindow(1, 1 if window.with_grad else 0), loss_fn)

    def run_multi_pass(self, run):
        """Multi-pass objectives drive the stages themselves (the split does not apply to them)."""
        return self.inner.run_multi_pass(run)

    def bubble_fraction(self) -> float:
        return self.inner.bubble_fraction()
