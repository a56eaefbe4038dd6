"""A differentiable whole-model forward across pipeline stages (stage-to-stage autograd transport), for objectives
that run the model several times per micro-batch (Coconut's continuous thoughts, Quiet-STaR's thoughts) and feed one pass's output into the next.

The looped pipeline schedule (recurdepth/parallel/pipeline.py) runs exactly one forward per micro-batch. Here
an objective writes its multi-pass logic once, as if the model were whole, and every pipeline stage runs the
same code:

    link = StageLink()                                   # one per micro-batch
    out = pipelined_forward(model, window, link, input_ids=..., labels=..., return_hidden=True)
    thought = link.last_to_first(hidden)                 # the last stage's output reaches stage 0, with its grad
    ...                                                  # more passes, using `thought` on stage 0
    link.backward(loss if link.is_last else None)        # every stage: one backward over its whole graph

`pipelined_forward` runs embed (+ prelude, s_0) on stage 0, each iteration's core chunk on every stage in
ring order (the state goes stage s -> s+1, and from the last stage back to stage 0 between iterations), and
the head on the last stage, which alone gets its output. Truncated backprop's no-grad iterations run under
`torch.no_grad()` on every stage, as in the whole model.

Messages are autograd-aware point-to-point ops: `_Send`'s forward sends and its backward receives the
gradient of what it sent; `_Recv`'s forward receives and its backward sends the gradient back. Each stage
keeps the dummy outputs of its sends (and, with a zero gradient, the tensors it received, so that a received
tensor that turned out unused still answers its sender) and `StageLink.backward` back-propagates them
together with the loss in ONE `torch.autograd.backward` call. Why that cannot deadlock: autograd runs, among
the nodes that are ready, the one created last (highest sequence number), and the unexecuted node created
last is always ready (its consumers were created after it), so each stage runs its backward nodes in exactly
the reverse order of its forward; reversing a forward that completed gives a backward whose message
dependencies are the forward's reversed, hence acyclic. Backward sends are `isend`s (waited for at the end),
backward receives block.

Matching: messages between a pair of stages are numbered in the order both sides issue them (every stage
runs the same sequence of calls), tag 2n for the forward message n and 2n+1 for its gradient, so gloo's
tag matching and NCCL's in-order matching agree. A receiver must know the shape, dtype and whether the
sender keeps a gradient: `pipelined_forward` derives them from the window; `last_to_first` takes them.

Under pipeline parallelism `run_micro_batches` interleaves the micro-batches (all of a step's, or groups of
`parallel.multi_pass_in_flight`): each micro-batch's program is a greenlet on this thread, and the programs take
turns at every trip (`StageLink.take_turn`), so each stage runs the micro-batches' trips round-robin and always
has another micro-batch's trip to run while one's message travels; one backward over the group then replays the
interleaved forward in reverse, interleaved the same way (autograd numbers nodes per thread: one thread keeps the
creation order true). Links of one step tag their messages apart (`tag_base`). With `parallel.record_timeline`
each stage records its ops and the messages between them (`StageRecorder`), and `schedule.recorded_timeline`
replays them in the looped schedule's logical time (F/f = 1, B = 2), so the bubble of a multi-pass objective and
of the plain LM are measured the same way (tests/objectives: within 1.2x of the LM's at the same p, r, m, where
running them one after another idles half the time at p = 2). Tested on gloo/CPU.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import defaultdict
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from recurdepth.model.depth import BackpropWindow


def unwrap(model):
    """The `LoopedGPTModel` (stage) inside DDP-style wrappers (`.module`)."""
    while not hasattr(model, "core_chunk") and hasattr(model, "module"):
        model = model.module
    return model


class _Send(torch.autograd.Function):
    """forward: send `x` to stage `dst` (returns a dummy scalar to back-propagate from); backward: receive the
    gradient of `x` from `dst`."""

    @staticmethod
    def forward(ctx, x: Tensor, anchor: Tensor, link: "StageLink", dst: int, tag: int) -> Tensor:
        link._isend(x, dst, tag)
        ctx.link, ctx.dst, ctx.tag = link, dst, tag
        ctx.meta = (tuple(x.shape), x.dtype, x.device)
        return anchor.detach().new_zeros(())

    @staticmethod
    def backward(ctx, _grad: Tensor):
        shape, dtype, device = ctx.meta
        grad = ctx.link._recv_now(ctx.dst, shape, dtype, device, ctx.tag + 1)
        return grad, None, None, None, None


class _Recv(torch.autograd.Function):
    """forward: receive a tensor from stage `src`; backward: send its gradient back to `src`."""

    @staticmethod
    def forward(ctx, anchor: Tensor, link: "StageLink", src: int, tag: int, meta: tuple) -> Tensor:
        ctx.link, ctx.src, ctx.tag = link, src, tag
        shape, dtype, device = meta
        return link._recv_now(src, shape, dtype, device, tag)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.link._isend(grad, ctx.src, ctx.tag + 1)
        return None, None, None, None, None


class StageLink:
    """This rank's connection to the other pipeline stages for one micro-batch's passes, and the bookkeeping
    of its backward (see the module docstring). `group`: the pipeline group (default: megatron's, or no
    pipeline when parallel_state is not initialised); stage index = rank in the group.
    `passes` counts `pipelined_forward` calls made with this link (the same on every stage)."""

    def __init__(self, group=None, tag_base: int = 0, turns: Optional["Turns"] = None,
                 recorder: Optional["StageRecorder"] = None, micro_batch: int = 0):
        if group is None:
            from megatron.core import parallel_state as ps

            if ps.model_parallel_is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
                group = ps.get_pipeline_model_parallel_group()
        self.group = group
        self.p = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.ranks = dist.get_process_group_ranks(group) if group is not None else [0]
        self.passes = 0
        # concurrent links (one per micro-batch of a group, `run_micro_batches`) keep their tags apart, take turns
        # on this stage (`turns`) and report what they run to the stage's `recorder`
        self.tag_base, self.turns = tag_base, turns
        self.recorder, self.micro_batch = recorder, micro_batch
        self._ran = False  # a trip ran since the last turn
        self._count: dict[tuple[int, int], int] = defaultdict(int)  # (src, dst) -> messages so far
        self._anchors: dict = {}  # per device: a leaf that gives every message an autograd node
        self._roots: list[tuple[Tensor, bool]] = []  # (tensor, is a send's dummy) to back-propagate from
        self._pending: list = []  # (work, tensor) of isends not yet waited for

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.p - 1

    def _anchor(self, device) -> Tensor:
        # on the message's device: autograd then runs the message's backward in the same (device) queue as the
        # rest of the graph, in the reverse-creation order the module docstring relies on
        if device not in self._anchors:
            self._anchors[device] = torch.zeros((), device=device, requires_grad=True)
        return self._anchors[device]

    # ------------------------------------------------------------------ raw messages

    def _isend(self, x: Tensor, dst: int, tag: int) -> None:
        x = x.detach().contiguous()
        self._pending.append((dist.isend(x, dst=self.ranks[dst], group=self.group, tag=tag), x))
        if self.recorder is not None:
            self.recorder.sent((self.rank, dst, tag))

    def _recv_now(self, src: int, shape, dtype, device, tag: int) -> Tensor:
        buf = torch.empty(shape, dtype=dtype, device=device)
        dist.irecv(buf, src=self.ranks[src], group=self.group, tag=tag).wait()
        if self.recorder is not None:
            self.recorder.received((src, self.rank, tag))
        return buf

    def _next_tag(self, src: int, dst: int) -> int:
        n = self._count[(src, dst)]
        self._count[(src, dst)] = n + 1
        return self.tag_base + 2 * n

    def take_turn(self) -> None:
        """A point where this stage may run another micro-batch's program (`run_micro_batches`): before each trip
        of `pipelined_forward` and, on the receiving stage, before a last-to-first message (the sender sends as
        soon as it has it); a point with no trip run since the one before is no turn, so the receive and the
        next pass's first trip are one turn. Every stage takes one turn per trip, in the same order."""
        if self.turns is not None and self._ran:  # a turn always covers some work: consecutive points are one
            self._ran = False
            self.turns.pass_turn()

    # ------------------------------------------------------------------ autograd-aware messages

    def send(self, x: Tensor, dst: int, requires_grad: bool) -> None:
        """Send `x` to stage `dst`. With `requires_grad` (the receiver must pass the same), `backward` will
        receive the gradient of `x` from `dst` and back-propagate it into `x`'s graph."""
        tag = self._next_tag(self.rank, dst)
        if requires_grad and torch.is_grad_enabled():
            self._roots.append((_Send.apply(x, self._anchor(x.device), self, dst, tag), True))
        else:
            self._isend(x, dst, tag)

    def recv(self, src: int, shape: Sequence[int], dtype: torch.dtype, device, requires_grad: bool) -> Tensor:
        """Receive a tensor from stage `src`; with `requires_grad` its gradient goes back to `src` in `backward`."""
        tag = self._next_tag(src, self.rank)
        meta = (tuple(shape), dtype, torch.device(device))
        if requires_grad and torch.is_grad_enabled():
            x = _Recv.apply(self._anchor(meta[2]), self, src, tag, meta)
            self._roots.append((x, False))  # a zero gradient makes its backward run even if x went unused
            return x
        return self._recv_now(src, *meta, tag)

    def last_to_first(self, x: Optional[Tensor], shape: Sequence[int], dtype: torch.dtype, device,
                      requires_grad: Optional[bool] = None) -> Optional[Tensor]:
        """The last stage's `x` on the first stage (e.g. Coconut's hidden state fed back as input): returns `x`
        on the last stage (and with one stage), the received tensor on the first, None in between.
        `requires_grad` (default: grad mode) must be the same on both; the gradient then flows back."""
        if self.p == 1:
            return x
        if self.is_first:
            self.take_turn()
        grad = torch.is_grad_enabled() if requires_grad is None else requires_grad
        if self.is_last:
            self.send(x, 0, grad)
            return x
        if self.is_first:
            return self.recv(self.p - 1, shape, dtype, device, grad)
        return None

    def share_from_last(self, x: Optional[Tensor], shape: Sequence[int], dtype: torch.dtype, device) -> Tensor:
        """The last stage's `x` on every stage, without gradient (sampled token ids, masks): a broadcast."""
        if self.p == 1:
            return x
        self.take_turn()
        buf = x.detach().contiguous() if self.is_last else torch.empty(tuple(shape), dtype=dtype, device=device)
        dist.broadcast(buf, src=self.ranks[-1], group=self.group)
        return buf

    # ------------------------------------------------------------------ backward

    def backward(self, loss: Optional[Tensor] = None) -> None:
        """Back-propagate this stage's whole graph of the micro-batch in one call: `loss` (a scalar, on the last
        stage; None elsewhere), the sends (gradients arrive from their receivers) and the receives (their
        gradients go back). Under no_grad it only waits for the pending sends. Call it once per link."""
        backward_together([self], [loss])

    def _backward_roots(self, loss: Optional[Tensor]) -> list:
        roots = [(t, torch.ones_like(t) if is_send else torch.zeros_like(t)) for t, is_send in self._roots]
        if loss is not None and loss.requires_grad:
            roots.insert(0, (loss, torch.ones_like(loss)))
        self._roots = []
        return roots

    def wait(self) -> None:
        """Wait for every pending send (their buffers must stay alive until then)."""
        for work, _ in self._pending:
            work.wait()
        self._pending = []


def backward_together(links: Sequence[StageLink], losses: Sequence[Optional[Tensor]]) -> None:
    """One backward over the graphs of several links of this stage (micro-batches whose forwards ran interleaved):
    autograd runs the ready node created last first, so the backward replays the interleaved forward in reverse,
    hence deadlock-free (module docstring) and interleaved the same way. Then waits for every pending send."""
    roots = [root for link, loss in zip(links, losses) for root in link._backward_roots(loss)]
    if roots:
        torch.autograd.backward([t for t, _ in roots], [g for _, g in roots])
    for link in links:
        link.wait()


class Turns:
    """Cooperative turns among the micro-batch programs of one stage, each a greenlet of this thread: exactly one
    runs at a time, from one `take_turn` point to the next, in round-robin order (0, 1, .., n-1, 0, ..), the same
    on every stage. One OS thread: no races on gradients, collectives in program order, and autograd numbers the
    nodes in the order they were created across the programs (its sequence numbers are per thread), which the
    group's single backward relies on. Each program keeps its own grad mode across its turns; a program that
    waits for a message holds the turn, as a single program would."""

    def __init__(self):
        from greenlet import getcurrent

        self.scheduler = getcurrent()

    def pass_turn(self) -> None:
        mode = torch.is_grad_enabled()
        self.scheduler.switch()
        torch.set_grad_enabled(mode)

    def run(self, programs: list) -> list:
        """Run `programs` (callables) to the end in turns; their results."""
        from greenlet import greenlet

        mode = torch.is_grad_enabled()
        results: list = [None] * len(programs)

        def body(i: int):
            def go():
                torch.set_grad_enabled(mode)
                results[i] = programs[i]()
            return go

        live = [greenlet(body(i)) for i in range(len(programs))]
        while any(not g.dead for g in live):
            for g in live:
                if not g.dead:
                    g.switch()  # returns at the program's next turn point or its end; raises what it raised
                    torch.set_grad_enabled(mode)
        return results


class StageRecorder:
    """What this stage ran for one step's multi-pass micro-batches, for the schedule's logical timeline
    (`schedule.recorded_timeline`): its ops in order, forward chunks "F"/"f" of each trip and backward chunks "B",
    each `[kind, micro_batch, pass, iteration, needed, produced]`, where `needed` are the messages received since
    the op before it and `produced` those sent after it (a message = (source stage, destination stage, tag))."""

    def __init__(self):
        self.ops: list = []
        self._received: list = []
        self._lock = threading.Lock()  # autograd may run backward nodes of other devices in its own threads

    def op(self, kind: str, micro_batch: int, pass_index: int, iteration: int) -> None:
        with self._lock:
            self.ops.append([kind, micro_batch, pass_index, iteration, self._received, []])
            self._received = []

    def received(self, message: tuple) -> None:
        with self._lock:
            self._received.append(message)

    def sent(self, message: tuple) -> None:
        with self._lock:
            if self.ops:
                self.ops[-1][5].append(message)

    def gather(self, group) -> list:
        """Every stage's ops (index = stage in `group`), on every stage."""
        if group is None:
            return [self.ops]
        out = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, self.ops, group=group)
        return out


class _ChunkBackwardEnd(torch.autograd.Function):
    """Identity on a chunk's inputs (state, and e on the first stage); its backward, which autograd runs once the
    chunk's backward has reached them, records the chunk's "B" op."""

    @staticmethod
    def forward(ctx, recorder, key, *xs):
        ctx.recorder, ctx.key = recorder, key
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.recorder.op("B", *ctx.key)
        return (None, None, *grads)


def batch_shape(input_ids=None, inputs_embeds=None, labels=None, shape=None) -> tuple[int, int]:
    """(b, s) of a micro-batch from whichever input this stage has."""
    for t in (input_ids, labels, inputs_embeds):
        if t is not None:
            return int(t.shape[0]), int(t.shape[1])
    if shape is None:
        raise ValueError("pipelined_forward needs input_ids, inputs_embeds, labels or batch_shape=(b, s) on every stage")
    return int(shape[0]), int(shape[1])


def pipelined_forward(model, window: BackpropWindow, link: StageLink, *, input_ids: Optional[Tensor] = None,
                      inputs_embeds: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                      attention_mask: Optional[Tensor] = None, sample_ids: Optional[Sequence[int]] = None,
                      labels: Optional[Tensor] = None, return_hidden: bool = False,
                      batch_shape_: Optional[tuple[int, int]] = None, state_length: Optional[int] = None,
                      s0: Optional[Tensor] = None, attend_at=None, return_state: bool = False):
    """One whole-model forward (`LoopedGPTModel.forward`'s arguments) across the pipeline stages.

    Every stage calls it with the same window and with what it has: stage 0 needs `input_ids [b, s]` or
    `inputs_embeds [b, s, h]` (and `sample_ids` for s_0), the last stage `labels` if it wants the loss; every
    stage the same `position_ids [s]` / `attention_mask` (they apply in each block) and something giving
    (b, s) (`input_ids`, `labels` or `batch_shape_`). Returns on the last stage what the model's head returns
    (per-token loss `[b, s]` or logits `[b, s, v/tp]`, with `return_hidden` also the final-norm hidden
    `[b, s, h]`), None on other stages. With one stage it is the model's forward (without health metrics).
    `state_length` (> s, not with sequence parallelism): draw s_0 as for that many positions and keep the first
    s, so a pass over a prefix sees the s_0 of the whole sequence (s_0 draws are not prefix-stable). `s0 [s, b, h]`
    (first stage): start from this initial state instead of a draw (as the model's forward takes it).
    `attend_at(iteration)` replaces the layers' self-attention (KV caches, block-sparse masks): called with None
    for the prelude and the coda and with the 0-based iteration for each trip through the core, it returns the
    model's `attend_for(name, layer)` hook (see `LoopedGPTModel._blocks`), which replaces every layer's attention
    (RoPE included: the layers get no RoPE table then). `return_state`: the last stage returns (head output, s_r)."""
    m = unwrap(model)
    link.passes += 1
    b, s = batch_shape(input_ids, inputs_embeds, labels, batch_shape_)
    tp_seq = 1
    if m.config.sequence_parallel:
        from megatron.core import parallel_state as ps

        tp_seq = ps.get_tensor_model_parallel_world_size()
    param = next(m.parameters())
    shape, dtype, device = (s // tp_seq, b, m.config.hidden_size), m.config.params_dtype, param.device
    grad_on = torch.is_grad_enabled()
    last_stage = link.p - 1
    e = state = None
    if m.is_first:
        e = m.embed(input_ids, inputs_embeds, position_ids, attention_mask,
                    attend_for=None if attend_at is None else attend_at(None))
        if s0 is not None:
            state = s0
        elif state_length is not None and state_length > e.shape[0]:
            if m.config.sequence_parallel:
                raise ValueError("state_length is not supported with sequence parallelism")
            state = m.initial_state(e.new_empty((state_length, *e.shape[1:])), sample_ids)[:e.shape[0]]
        else:
            state = m.initial_state(e, sample_ids)
    rope = m.rope(s, position_ids) if attend_at is None else None  # the hooks apply RoPE themselves
    rec = link.recorder
    for it in window.iterations():  # the model's loop, one trip around the ring of stages per iteration
        link.take_turn()
        with_grad = grad_on and it.grad
        with torch.set_grad_enabled(with_grad):
            if not m.is_first:
                state = link.recv(link.rank - 1, shape, dtype, device, with_grad)
            elif it.index > 1 and link.p > 1:
                state = link.recv(last_stage, shape, dtype, device, grad_on and window.grad_at(it.index - 1))
            chunk_e = e
            if rec is not None:
                key = (link.micro_batch, link.passes, it.index)
                rec.op("F" if with_grad else "f", *key)
                if with_grad:
                    state, chunk_e = (_ChunkBackwardEnd.apply(rec, key, state, e) if e is not None
                                      else (_ChunkBackwardEnd.apply(rec, key, state)[0], None))
            state = m.iteration(it, state, chunk_e, rope, attention_mask,
                                attend_for=None if attend_at is None else attend_at(it.index - 1))
            link._ran = True
            if not m.is_last:
                link.send(state, link.rank + 1, with_grad)
            elif not it.last and link.p > 1:
                link.send(state, 0, with_grad)
    if not m.is_last:
        return None
    out = m.head(state, labels, position_ids, attention_mask, return_hidden,
                 attend_for=None if attend_at is None else attend_at(None))
    return (out, state) if return_state else out


_RECORDING: list = []  # what `multi_pass_options` installed (stacks), for run_micro_batches calls inside it
_IN_FLIGHT: list = []


@contextlib.contextmanager
def multi_pass_options(recorder: Optional[StageRecorder] = None, in_flight: int = 0):
    """Within the block, `run_micro_batches` reports to `recorder` (None: not recording) and runs `in_flight`
    micro-batches at a time (0: all of them; `parallel.multi_pass_in_flight`)."""
    _RECORDING.append(recorder)
    _IN_FLIGHT.append(in_flight)
    try:
        yield recorder
    finally:
        _RECORDING.pop()
        _IN_FLIGHT.pop()


def run_micro_batches(model, batches: list, window: BackpropWindow, mb_loss,
                      recorder: Optional[StageRecorder] = None) -> Tensor:
    """`Objective.pipeline_run` for a multi-pass objective: `mb_loss(model, mb, window, link)` (its summed loss on
    the last stage, None elsewhere) for every micro-batch, and the backward. Returns the summed loss (float32) on
    the last stage, zero on the others.

    Under pipeline parallelism the micro-batches run interleaved, all of the step's at once or in groups of
    `multi_pass_options(in_flight=n)`: each micro-batch's program runs as a greenlet, taking turns (`Turns`) at
    every trip of `pipelined_forward` and before every last-to-first receive, so every stage runs the trips of
    the group's micro-batches round-robin (trip-major, as the looped schedule's forward order) and has another
    micro-batch's trip to run while one's message travels; then one backward over the group
    (`backward_together`) replays it in reverse. The group's activations are all held until its backward (memory
    ~ n micro-batches; n = 1 runs them one after another, bubble ~ (p-1)/p). With one stage: one after another.
    `recorder` keeps what this stage ran, for the logical timeline (`schedule.recorded_timeline`); default:
    `multi_pass_options`'s."""
    if recorder is None and _RECORDING:
        recorder = _RECORDING[-1]
    total = None
    probe = StageLink()
    size = (_IN_FLIGHT[-1] if _IN_FLIGHT and _IN_FLIGHT[-1] else len(batches)) if probe.p > 1 else 1
    for g0 in range(0, len(batches), size):
        group = batches[g0:g0 + size]
        links, losses = _run_group(model, group, window, mb_loss, g0, recorder)
        last = links[0].is_last
        backward_together(links, losses if last else [None] * len(links))
        if last:
            for loss in losses:
                total = loss.detach().float() if total is None else total + loss.detach().float()
    if total is None:
        total = torch.zeros((), dtype=torch.float32, device=next(unwrap(model).parameters()).device)
    return total


def _run_group(model, group: list, window: BackpropWindow, mb_loss, first: int, recorder) -> tuple[list, list]:
    """The forwards of one group of micro-batches: (links, losses), several in turns (`Turns`)."""
    turns = Turns() if len(group) > 1 else None
    links = [StageLink(tag_base=(first + i) << 20, turns=turns, recorder=recorder, micro_batch=first + i)
             for i in range(len(group))]
    if turns is None:
        return links, [mb_loss(model, group[0], window, links[0])]
    return links, turns.run([functools.partial(mb_loss, model, mb, window, link) for mb, link in zip(group, links)])
