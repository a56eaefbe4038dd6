"""The recurrence-aware pipeline schedule: one loop iteration is one trip around a ring of stages.

Layout (p stages in `pp_group`). The core's R layers are split over the p stages; stage 0 also holds
embedding + prelude + adapter + the initial state, stage p-1 also holds coda + final norm + head:

    stage 0:   E: e = prelude(embed(x)), s_0          F/f: x = core_0(adapter(s_{j-1}, e))
    stage s:   F/f: x = core_s(x)                     (0 < s < p-1)
    stage p-1: F/f: s_j = core_{p-1}(x)  -> back to stage 0 for iteration j+1;  after s_r: H = head + loss

Ops (an `Op(kind, micro_batch, iteration)`; the per-stage order is `build_order`, a pure function):
  "E"  stage 0, once per micro-batch: embed + prelude (kept with its graph), the initial state s_0.
  "f"  forward of one core chunk of a no-grad iteration j <= r-k (truncated backprop): under
       `torch.no_grad()`, keeps nothing, sends its output on.
  "F"  forward of one core chunk of a grad iteration j > r-k: keeps (input leaf, output) for "B".
  "H"  last stage, once per micro-batch, right after the chunk of iteration r: head + loss forward AND
       the head's backward (into the head's parameters and grad(s_r), kept locally for B(mb, r)).
  "B"  backward of one core chunk: `autograd.backward(output, grad_output)`; sends grad(input) to the
       previous stage (stage s -> s-1 within an iteration; stage 0 -> stage p-1 across iterations, except at
       the first grad iteration whose input state is detached). Stage 0 accumulates grad(e) over all grad
       iterations of a micro-batch into one leaf and, in the B of the micro-batch's first grad iteration
       (its last backward trip), backpropagates that sum into prelude/embedding once.

Scheduling ("interleaved 1F1B with v = r weight-sharing virtual stages"). Every stage runs the SAME
forward sequence of (micro_batch, iteration) chunks, megatron's interleaved order: micro-batches in groups
of p, and within a group all r iterations, iteration-major (j=1: mb g*p..g*p+p-1, j=2: ..., j=r). With
groups of p the ring is exactly full: stage 0 starts iteration j+1 of a micro-batch just when stage p-1
finishes iteration j. The backward sequence is the same per group with the grad iterations reversed
(j = r .. r-k+1); the backward ring is exactly full too (B = 2 units per hop). Each stage interleaves the
two sequences greedily in logical time (F/f = 1 unit, B = 2, E/H = 0, communication free): when free, it
runs the next forward if its input has arrived and, for an "F", fewer than `cap` = p k - stage chunks
hold activations; else the next B if its gradient has arrived; else it idles until one is ready.
  warm-up:   forwards only: the first group's no-grad trips and grad trips (stage s stops at p k - s
             chunks with activations, i.e. stage 0 holds exactly one group's grad trips);
  steady:    the cap is reached, so every B frees one slot for one "F": B and F alternate, while the
             next group's no-grad trips ("f", no slot needed) run in the gaps as their inputs arrive;
  cool-down: the last group's B's.
E.g. p=2, r=k=4, m=4 (kinds in order): stage 0 F x8, (B F) x8, B x8; stage 1 F x7, (B F) x9, B x7.
`build_order` runs that simulation once, globally, and returns each stage's op order (if a cap were too
small to complete, it is raised by one until the order completes; not needed for any case tried); the
executor then simply follows its order, so the timeline it records (each op starts at max(stage free,
arrival of its input), arrival = the logical end time carried by the message) reproduces the simulated
one exactly. For p | m this reaches the fill/drain-only bubble below (checked for p <= 8, r <= 8,
m <= 16); a partial last group (p not dividing m) leaves holes in the ring.

Forward only: with k = 0 (`BackpropWindow(r, 0)`, evaluation) `run` does no backward at all and leaves
gradients untouched (training always has k >= 1).

Bubble: with k >= r every micro-batch costs each stage 3r units and the only idle time is the ring's fill
and drain, 3(p-1) units, so idle / ideal = (p-1)/(r m) (`expected_bubble`); idle / (p * makespan),
which `bubble_fraction` reports, is (p-1)/(r m + p - 1). With k < r a micro-batch costs r + 2k units per
stage (no-grad trips are forward-only), so the same fill/drain gives 3(p-1)/(m (r + 2k)), i.e.
`expected_bubble` with r replaced by the cost-weighted depth (r + 2k)/3 (`expected_bubble_window`).

Communication: `torch.distributed.isend/irecv` on `pp_group`, one message per tensor (never batched, so
PP=2, where next and previous stage are the same rank, is unambiguous), each with a tag naming
(direction, micro-batch, iteration). Receives from each peer are posted in the order that peer sends
(computed from the peer's op order), a little ahead of need, so the matching is also correct for
transports that match by order rather than by tag. Sends are not waited for until the end of `run`.
Logical times travel as a one-element float64 tensor next to each message (only if `record_timeline`;
it must then be the same on all stages) and stay on the device until `run` ends, so timing adds no
host-device sync; the finished timeline is all-gathered over `pp_group` once per `run`. Checked on
gloo/CPU only: on NCCL, where p2p ops between a pair are matched in order on one stream, a large send
could wait for its receive; receives are posted ahead, but that has not been run.

Integration notes: `run` only accumulates gradients through autograd (no zeroing, no grad sync); with
megatron DDP, wrap it in `no_sync()` and finish the grad sync afterwards as megatron's own schedules do.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional, Protocol, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from recurdepth.model.depth import BackpropWindow

from recurdepth.parallel.schedule import (  # noqa: F401 - the pure schedule, re-exported
    DURATION, Op, TimelineSlot, expected_bubble, expected_bubble_window, idle_over_makespan, forward_sequence, backward_sequence, op_inputs, expected_ops, default_cap, ScheduleDeadlock, build_order, check_order, simulate_timeline, timeline_bubble, max_in_flight, produced_message, needed_message, message_tag, _fkind, _execute, _greedy)


class LoopedStage(Protocol):
    """One pipeline stage of a looped model; see the module docstring for what each part holds."""

    is_first: bool
    is_last: bool

    def embed(self, tokens: Tensor) -> Tensor: ...  # first only: e [s, b, h] (prelude output)

    def initial_state(self, e: Tensor, sample_ids) -> Tensor: ...  # first only: s_0 [s, b, h]

    def core_chunk(self, x: Tensor, e: Optional[Tensor], it=None) -> Tensor: ...  # first: adapter(x, e), its layers;
    # `it` (model.depth.Iteration): run as that iteration of the window (no grad / grad / checkpointed)

    def head(self, x: Tensor, labels: Tensor) -> Tensor: ...  # last only: per-token loss [b, s]


class LoopedPipelineSchedule:
    """Runs one optimizer step's micro-batches through the ring of stages; see the module docstring.

    `stage`: this rank's `LoopedStage`; `pp_group`: the pipeline group (stage index = rank in the group,
    stage 0 = first); `tensor_shape`/`dtype`: of the state passed between stages ([s, b, h]).
    `record_timeline` (same on every stage) keeps `timeline` and `bubble_fraction()` for the last run.
    """

    LOOKAHEAD = 2  # receives are posted for the inputs of the current and the next LOOKAHEAD ops

    def __init__(self, stage: LoopedStage, pp_group, tensor_shape: tuple, dtype: torch.dtype, device,
                 record_timeline: bool = True, multi_pass_in_flight: int = 0):
        self.stage, self.group = stage, pp_group
        self.tensor_shape, self.dtype, self.device = tuple(tensor_shape), dtype, torch.device(device)
        self.record_timeline = record_timeline
        self.multi_pass_in_flight = multi_pass_in_flight  # `run_multi_pass`: micro-batches at a time, 0 = all
        self.p = dist.get_world_size(pp_group)
        self.rank = dist.get_rank(pp_group)
        self.ranks = dist.get_process_group_ranks(pp_group)
        if bool(stage.is_first) != (self.rank == 0) or bool(stage.is_last) != (self.rank == self.p - 1):
            raise ValueError(f"stage {self.rank} of {self.p}: is_first={stage.is_first}, is_last={stage.is_last} "
                             "do not match its rank in the pipeline group")
        # a stage that takes the iteration (`LoopedGPTModel.core_chunk(..., it=)`) runs it as its window says
        # (checkpointed under recurrence.checkpoint_iterations); a plain `core_chunk(x, e)` is called as it is
        self.stage_takes_iteration = "it" in inspect.signature(stage.core_chunk).parameters
        self.timeline: list[TimelineSlot] = []
        self.last_orders: Optional[list[list[Op]]] = None
        self._orders_cache: dict = {}

    # -------------------------------------------------------------- public

    def orders(self, m: int, window: BackpropWindow) -> list[list[Op]]:
        key = (m, window.total, window.with_grad)
        if key not in self._orders_cache:
            self._orders_cache[key] = build_order(self.p, m, window)
        return self._orders_cache[key]

    def bubble_fraction(self) -> float:
        """Idle time over all stages / (p * makespan), from the last run's timeline."""
        return timeline_bubble(self.timeline, self.p)

    def run_multi_pass(self, run: Callable[[], Tensor]) -> Tensor:
        """A multi-pass objective's `pipeline_run` (it drives the stages itself, `multi_pass_in_flight` micro-batches
        at a time, 0 = all: parallel/passes.py); with `record_timeline`, `timeline` is then what the stages recorded
        running, in this schedule's logical time."""
        from recurdepth.parallel.passes import StageRecorder, multi_pass_options
        from recurdepth.parallel.schedule import recorded_timeline

        recorder = StageRecorder() if self.record_timeline else None
        with multi_pass_options(recorder, self.multi_pass_in_flight):
            total = run()
        if recorder is not None:
            self.timeline = recorded_timeline(recorder.gather(self.group if self.p > 1 else None), self.p)
        return total

    def run(self, micro_batches: list, window: BackpropWindow, loss_fn: Callable[[Tensor, object], Tensor],
            readouts: Optional[tuple] = None) -> Tensor:
        """`readouts` = (iterations, readout_loss): the last stage also reads the state out (coda, final norm, head,
        `stage.head(x, labels, return_hidden=True)`) right after its chunk of each listed iteration, keeping the
        graph; H, after iteration r, then computes `readout_loss(picked, losses [n, b, s], hidden [n, b, s, h],
        mb)` over all of them, back-propagates it once, and each grad iteration's readout gradient is added to
        the gradient B receives for that iteration's state (the adaptive-depth objectives). r must be among the
        iterations. The op order and the logical timeline are unchanged (readouts cost no schedule time, as H)."""
        m = len(micro_batches)
        orders = self.orders(m, window)
        self.last_orders = orders
        if readouts is not None and window.total not in readouts[0]:
            raise ValueError(f"readouts {readouts[0]} must include the last iteration {window.total}")
        run = _Run(self, orders, micro_batches, window, loss_fn, readouts)
        total = run.execute()
        if self.record_timeline:
            mine = [(self.rank, op.kind, op.micro_batch, op.iteration, s, e)
                    for op, (s, e) in zip(orders[self.rank], run.slot_times())]
            gathered: list = [None] * self.p
            if self.p > 1:
                dist.all_gather_object(gathered, mine, group=self.group)
            else:
                gathered = [mine]
            self.timeline = [TimelineSlot(*row) for rows in gathered for row in rows]
        return total


class _Run:
    """The state of one `LoopedPipelineSchedule.run`."""

    def __init__(self, sched: LoopedPipelineSchedule, orders, micro_batches, window: BackpropWindow, loss_fn,
                 readouts: Optional[tuple] = None):
        self.s, self.orders, self.mbs, self.window, self.loss_fn = sched, orders, micro_batches, window, loss_fn
        self.read_at, self.readout_loss = (set(readouts[0]), readouts[1]) if readouts is not None else (None, None)
        self.reads: dict[int, list] = {}  # mb -> [(j, state leaf, losses [b, s], hidden [b, s, h])] (last stage)
        self.p, self.me = sched.p, sched.rank
        self.order: list[Op] = orders[self.me]
        self.grad = window.with_grad > 0
        # receives from each source stage, in the order that stage sends them
        self.incoming: dict[int, list[tuple]] = {}
        for src in range(self.p):
            if src == self.me:
                continue
            keys = []
            for op in orders[src]:
                msg = produced_message(op, src, self.p, window)
                if msg is not None and msg[0] == self.me:
                    keys.append(msg[1])
            self.incoming[src] = keys
        self.next_post = {src: 0 for src in self.incoming}
        self.posted: dict[tuple[int, tuple], tuple] = {}  # (src, key) -> (data buf, data work, time buf, time work)
        self.local: dict[tuple, tuple] = {}  # messages to self: key -> (tensor, time)
        self.sends: list = []
        self.acts: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}  # (mb, j) -> (input leaf, output)
        self.e: dict[int, tuple[Tensor, Tensor]] = {}  # mb -> (e with its graph, e leaf used by the chunks)
        self.head_grad: dict[tuple[int, int], Tensor] = {}  # (mb, j) -> grad of s_j from the head / readouts
        rec = sched.record_timeline
        self.zero_t = torch.zeros((), dtype=torch.float64, device=sched.device) if rec else None
        self.free = self.zero_t
        self.times: list[tuple[Tensor, Tensor]] = []
        self.total = torch.zeros((), dtype=torch.float64, device=sched.device)
        self.total_set = False

    # ------------------------------------------------------------ communication

    def _post_upto(self, src: int, key: tuple) -> None:
        keys = self.incoming[src]
        while (src, key) not in self.posted:
            i = self.next_post[src]
            if i >= len(keys):
                raise RuntimeError(f"stage {self.me}: stage {src} never sends {key}")
            k = keys[i]
            self.next_post[src] = i + 1
            grp, peer, r = self.s.group, self.s.ranks[src], self.window.total
            buf = torch.empty(self.s.tensor_shape, dtype=self.s.dtype, device=self.s.device)
            work = dist.irecv(buf, src=peer, group=grp, tag=message_tag(k, r))
            tbuf = twork = None
            if self.s.record_timeline:
                tbuf = torch.empty(1, dtype=torch.float64, device=self.s.device)
                twork = dist.irecv(tbuf, src=peer, group=grp, tag=message_tag(k, r, time=True))
            self.posted[(src, k)] = (buf, work, tbuf, twork)

    def _prepost(self, idx: int) -> None:
        for op in self.order[idx: idx + 1 + self.s.LOOKAHEAD]:
            msg = needed_message(op, self.me, self.p, self.window)
            if msg is not None and msg[0] != self.me:
                self._post_upto(*msg)

    def _receive(self, op: Op) -> tuple[Tensor, Optional[Tensor]]:
        src, key = needed_message(op, self.me, self.p, self.window)
        if src == self.me:
            return self.local.pop(key)
        self._post_upto(src, key)
        buf, work, tbuf, twork = self.posted.pop((src, key))
        work.wait()
        if twork is not None:
            twork.wait()
            return buf, tbuf[0]
        return buf, None

    def _send(self, op: Op, tensor: Tensor, end_time: Optional[Tensor]) -> None:
        dst, key = produced_message(op, self.me, self.p, self.window)
        tensor = tensor.detach()
        if dst == self.me:
            self.local[key] = (tensor, end_time)
            return
        grp, peer, r = self.s.group, self.s.ranks[dst], self.window.total
        tensor = tensor.contiguous()
        self.sends.append((dist.isend(tensor, dst=peer, group=grp, tag=message_tag(key, r)), tensor))
        if self.s.record_timeline:
            t = end_time.reshape(1).clone()
            self.sends.append((dist.isend(t, dst=peer, group=grp, tag=message_tag(key, r, time=True)), t))
        if len(self.sends) > 64:  # drop completed sends
            self.sends = [(w, t) for w, t in self.sends if not w.is_completed()]

    # ------------------------------------------------------------ logical time

    def _clock(self, op: Op, arrival: Optional[Tensor]) -> Optional[Tensor]:
        """Record op's slot: start = max(free, arrival), end = start + duration; returns end."""
        if self.zero_t is None:
            return None
        start = self.free if arrival is None else torch.maximum(self.free, arrival)
        end = start + DURATION[op.kind]
        self.times.append((start, end))
        self.free = end
        return end

    def slot_times(self) -> list[tuple[float, float]]:
        if not self.times:
            return []
        return [tuple(x) for x in torch.stack([torch.stack(t) for t in self.times]).tolist()]

    # ------------------------------------------------------------ ops

    def execute(self) -> Tensor:
        st = self.s.stage
        for idx, op in enumerate(self.order):
            self._prepost(idx)
            getattr(self, "_op_" + ("f" if op.kind in "fF" else op.kind))(op, st)
        for work, _ in self.sends:
            work.wait()
        leftovers = (self.acts, self.e, self.head_grad, self.local, self.posted, self.reads)
        assert not any(leftovers), f"stage {self.me}: state left after the run: {[len(x) for x in leftovers]}"
        out = self.total
        return out if self.total_set else out.to(self.s.dtype)

    def _op_E(self, op: Op, st) -> None:
        mb = self.mbs[op.micro_batch]
        with torch.set_grad_enabled(self.grad):
            e = st.embed(mb.tokens)
        with torch.no_grad():
            s0 = st.initial_state(e.detach(), mb.sample_ids)
        e_leaf = e.detach().requires_grad_(self.grad and e.requires_grad)
        self.e[op.micro_batch] = (e, e_leaf)
        end = self._clock(op, None)
        self.local[("f", op.micro_batch, 0)] = (s0.detach(), end)

    def _op_f(self, op: Op, st) -> None:
        mb, j = op.micro_batch, op.iteration
        if self.me == 0 and j == 1:
            x, arrival = self.local.pop(("f", mb, 0))
        else:
            x, arrival = self._receive(op)
        e = self.e[mb][1] if self.me == 0 else None
        it = self.window.iteration(j)  # "f" / "F" are the window's no-grad / grad iterations (schedule.py)
        chunk = functools.partial(st.core_chunk, it=it) if self.s.stage_takes_iteration else st.core_chunk
        if not it.grad:
            with torch.no_grad():
                out = chunk(x, e)
        else:
            # the first grad iteration's input on stage 0 is the truncation point: no grad flows into it
            x = x.detach().requires_grad_(not (self.me == 0 and it.first_grad))
            with torch.enable_grad():
                out = chunk(x, e)  # the model's iteration: checkpointed under recurrence.checkpoint_iterations
            self.acts[(mb, j)] = (x, out)
        end = self._clock(op, arrival)
        if produced_message(op, self.me, self.p, self.window) is not None:
            self._send(op, out, end)
        if self.me == self.p - 1 and self.read_at is not None and j in self.read_at:
            leaf = out.detach().requires_grad_(self.grad and it.grad)
            with torch.set_grad_enabled(self.grad):  # the coda and head learn from every readout
                losses, hidden = st.head(leaf, self.mbs[mb].labels, return_hidden=True)
            self.reads.setdefault(mb, []).append((j, leaf, losses, hidden))
        elif self.me == self.p - 1 and j == self.window.total:
            self.head_input = out
        if self.me == 0 and j == self.window.total and not self.grad:
            del self.e[mb]  # forward only: e is not needed after the last trip

    def _op_H(self, op: Op, st) -> None:
        if self.read_at is not None:
            return self._readout_H(op)
        mb = self.mbs[op.micro_batch]
        out = self.head_input
        del self.head_input
        x = out.detach().requires_grad_(self.grad)
        with torch.set_grad_enabled(self.grad):
            loss = self.loss_fn(st.head(x, mb.labels), mb)
        if self.grad:
            torch.autograd.backward(loss)
            self.head_grad[(op.micro_batch, self.window.total)] = x.grad if x.grad is not None else torch.zeros_like(x)
        self.total = loss.detach() if not self.total_set else self.total + loss.detach()
        self.total_set = True
        self._clock(op, None)

    def _readout_H(self, op: Op) -> None:
        """H with readouts: the objective's loss over every readout of the micro-batch, one backward; the
        gradients of the grad iterations' states wait for their B's."""
        reads = self.reads.pop(op.micro_batch)
        picked = [j for j, *_ in reads]
        losses = torch.stack([r[2] for r in reads])
        hidden = torch.stack([r[3] for r in reads])
        with torch.set_grad_enabled(self.grad):
            loss = self.readout_loss(picked, losses, hidden, self.mbs[op.micro_batch])
        if self.grad:
            torch.autograd.backward(loss)
            for j, leaf, _, _ in reads:
                if leaf.requires_grad:
                    self.head_grad[(op.micro_batch, j)] = leaf.grad if leaf.grad is not None else \
                        torch.zeros_like(leaf)
        self.total = loss.detach() if not self.total_set else self.total + loss.detach()
        self.total_set = True
        self._clock(op, None)

    def _op_B(self, op: Op, st) -> None:
        mb, j = op.micro_batch, op.iteration
        if self.me == self.p - 1 and j == self.window.total:
            grad_out, arrival = self.head_grad.pop((mb, j)), None
        else:
            grad_out, arrival = self._receive(op)
            if self.me == self.p - 1 and (mb, j) in self.head_grad:  # this iteration's readout's gradient too
                grad_out = grad_out + self.head_grad.pop((mb, j))
        x, out = self.acts.pop((mb, j))
        torch.autograd.backward(out, grad_out)
        if self.me == 0 and self.window.iteration(j).first_grad:  # the micro-batch's last backward trip on stage 0
            e, e_leaf = self.e.pop(mb)
            if e_leaf.grad is not None and e.requires_grad:
                torch.autograd.backward(e, e_leaf.grad)
        end = self._clock(op, arrival)
        if produced_message(op, self.me, self.p, self.window) is not None:
            self._send(op, x.grad if x.grad is not None else torch.zeros_like(x), end)
