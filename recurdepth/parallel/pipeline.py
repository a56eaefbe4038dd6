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

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Protocol, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from recurdepth.model.depth import BackpropWindow

DURATION = {"E": 0.0, "H": 0.0, "f": 1.0, "F": 1.0, "B": 2.0}


class LoopedStage(Protocol):
    """One pipeline stage of a looped model; see the module docstring for what each part holds."""

    is_first: bool
    is_last: bool

    def embed(self, tokens: Tensor) -> Tensor: ...  # first only: e [s, b, h] (prelude output)

    def initial_state(self, e: Tensor, sample_ids) -> Tensor: ...  # first only: s_0 [s, b, h]

    def core_chunk(self, x: Tensor, e: Optional[Tensor]) -> Tensor: ...  # first: adapter(x, e) then its layers

    def head(self, x: Tensor, labels: Tensor) -> Tensor: ...  # last only: per-token loss [b, s]


class Op(NamedTuple):
    kind: str  # "E", "f", "F", "H", "B"
    micro_batch: int
    iteration: int  # 1..r for f/F/B; 0 for E; r for H


@dataclass
class TimelineSlot:
    """One op of one stage in logical time (F/f = 1, B = 2, E/H = 0 units: E is folded into the first
    forward of its micro-batch, H into the last stage's forward (head forward) and backward (its grad is
    computed with the forward, the chunk's B then uses it); the prelude's backward into the B of the
    micro-batch's first grad iteration on stage 0)."""

    stage: int
    kind: str
    micro_batch: int
    iteration: int
    start: float
    end: float


def expected_bubble(p: int, r: int, m: int) -> float:
    """Interleaved-1F1B bubble, idle / ideal compute, with v = r virtual stages: (p-1)/(r m)."""
    return (p - 1) / (r * m)


def expected_bubble_window(p: int, window: BackpropWindow, m: int) -> float:
    """The same for truncated backprop: a micro-batch costs r + 2k units per stage (no-grad trips are
    forward-only), the fill + drain is still 3(p-1) units, so idle / ideal = 3(p-1)/(m (r + 2k)). Equals
    `expected_bubble(p, r, m)` when k = r. (With k = 0, forward only: (p-1)/(r m).)"""
    r, k = window.total, window.with_grad
    if k == 0:
        return (p - 1) / (r * m)
    return 3 * (p - 1) / (m * (r + 2 * k))


def idle_over_makespan(bubble_over_ideal: float) -> float:
    """Convert idle/ideal (the formulas above) into idle/(p * makespan) (what `bubble_fraction` reports)."""
    return bubble_over_ideal / (1.0 + bubble_over_ideal)


# ---------------------------------------------------------------------------------------------------------
# the op order (pure functions)


def forward_sequence(p: int, m: int, r: int) -> list[tuple[int, int]]:
    """(micro_batch, iteration) in the order every stage runs its forward chunks: groups of p
    micro-batches, iteration-major within a group."""
    seq = []
    for g0 in range(0, m, p):
        group = range(g0, min(g0 + p, m))
        for j in range(1, r + 1):
            seq.extend((mb, j) for mb in group)
    return seq


def backward_sequence(p: int, m: int, window: BackpropWindow) -> list[tuple[int, int]]:
    r, n = window.total, window.no_grad
    seq = []
    for g0 in range(0, m, p):
        group = range(g0, min(g0 + p, m))
        for j in range(r, n, -1):
            seq.extend((mb, j) for mb in group)
    return seq


def _fkind(window: BackpropWindow, j: int) -> str:
    return "f" if j <= window.no_grad else "F"


def op_inputs(op: Op, stage: int, p: int, window: BackpropWindow) -> list[tuple[int, Op]]:
    """The ops (stage, op) whose results `op` on `stage` consumes (besides earlier ops of its own stage)."""
    r = window.total
    mb, j = op.micro_batch, op.iteration
    if op.kind == "E":
        return []
    if op.kind in "fF":
        if stage > 0:
            return [(stage - 1, Op(_fkind(window, j), mb, j))]
        deps = [(0, Op("E", mb, 0))]
        if j > 1:
            deps.append((p - 1, Op(_fkind(window, j - 1), mb, j - 1)))
        return deps
    if op.kind == "H":
        return [(p - 1, Op(_fkind(window, r), mb, r))]
    if op.kind == "B":
        deps = [(stage, Op("F", mb, j))]
        if stage < p - 1:
            deps.append((stage + 1, Op("B", mb, j)))
        elif j == r:
            deps.append((stage, Op("H", mb, r)))
        else:
            deps.append((0, Op("B", mb, j + 1)))
        return deps
    raise ValueError(f"unknown op kind {op.kind!r}")


def expected_ops(stage: int, p: int, m: int, window: BackpropWindow) -> list[Op]:
    """Every op `stage` must run exactly once (in no particular order)."""
    r, n = window.total, window.no_grad
    ops = []
    for mb in range(m):
        if stage == 0:
            ops.append(Op("E", mb, 0))
        ops.extend(Op(_fkind(window, j), mb, j) for j in range(1, r + 1))
        if stage == p - 1:
            ops.append(Op("H", mb, r))
        ops.extend(Op("B", mb, j) for j in range(n + 1, r + 1))
    return ops


def default_cap(p: int, stage: int, window: BackpropWindow) -> int:
    """Most grad chunks holding activations on `stage` at once: p k - stage (stage 0 holds one group's
    grad trips). The smallest cap that still reaches the fill/drain-only bubble when p divides m (searched
    over p <= 8, r <= 8, m <= 16: one less always costs bubble or cannot complete)."""
    return max(1, p * window.with_grad - stage)


class ScheduleDeadlock(RuntimeError):
    pass


def _greedy(p: int, m: int, window: BackpropWindow, caps: Sequence[int]) -> tuple[list[list[Op]], dict]:
    r = window.total
    fseq, bseq = forward_sequence(p, m, r), backward_sequence(p, m, window)
    orders: list[list[Op]] = [[] for _ in range(p)]
    ends: dict[tuple[int, Op], float] = {}
    fi, bi, inflight = [0] * p, [0] * p, [0] * p
    time = [0.0] * p
    total = [len(fseq) + len(bseq) for _ in range(p)]

    def ready(s: int, op: Op, t: float) -> bool:
        for dep in op_inputs(op, s, p, window):
            if dep[1].kind in ("E", "H"):
                continue  # E / H are run together with the op they are attached to
            if dep not in ends or ends[dep] > t:
                return False
        return True

    def run(s: int, op: Op, t: float) -> None:
        if op.kind in "fF" and s == 0 and op.iteration == 1:
            orders[s].append(Op("E", op.micro_batch, 0))
            ends[(s, orders[s][-1])] = t
        end = t + DURATION[op.kind]
        orders[s].append(op)
        ends[(s, op)] = end
        if op.kind in "fF" and s == p - 1 and op.iteration == r:
            orders[s].append(Op("H", op.micro_batch, r))
            ends[(s, orders[s][-1])] = end
        time[s] = end

    def try_b(s: int, t: float) -> Optional[Op]:
        if bi[s] < len(bseq):
            mb, j = bseq[bi[s]]
            op = Op("B", mb, j)
            if (s, Op("F", mb, j)) in ends and ready(s, op, t):
                bi[s] += 1
                inflight[s] -= 1
                return op
        return None

    def try_f(s: int, t: float) -> Optional[Op]:
        if fi[s] < len(fseq):
            mb, j = fseq[fi[s]]
            op = Op(_fkind(window, j), mb, j)
            if ready(s, op, t) and (op.kind == "f" or inflight[s] < caps[s]):
                fi[s] += 1
                inflight[s] += op.kind == "F"
                return op
        return None

    def decide(s: int, t: float) -> Optional[Op]:
        return try_f(s, t) or try_b(s, t)

    done = [0] * p
    while any(done[s] < total[s] for s in range(p)):
        live = [s for s in range(p) if done[s] < total[s]]
        t = min(time[s] for s in live)
        progressed = False
        for s in live:
            if time[s] == t:
                op = decide(s, t)
                if op is not None:
                    run(s, op, t)
                    done[s] += 1
                    progressed = True
        if not progressed:
            later = [time[s] for s in range(p) if time[s] > t]
            if not later:
                raise ScheduleDeadlock(f"p={p} m={m} {window} caps={list(caps)}")
            for s in live:
                if time[s] == t:
                    time[s] = min(later)
    return orders, ends


def build_order(p: int, m: int, window: BackpropWindow, caps: Optional[Sequence[int]] = None) -> list[list[Op]]:
    """Each stage's op order (index = stage in the pipeline group) for p stages, m micro-batches and the
    backprop window. Deterministic; every stage computes the same result. `caps` (per stage, default
    `default_cap`) bounds the chunks holding activations; a cap too small to make progress is raised by one
    until the order completes."""
    if p < 1 or m < 1 or window.total < 1:
        raise ValueError(f"need p >= 1, m >= 1, r >= 1; got p={p} m={m} r={window.total}")
    caps = list(caps) if caps is not None else [default_cap(p, s, window) for s in range(p)]
    while True:
        try:
            return _greedy(p, m, window, caps)[0]
        except ScheduleDeadlock:
            if min(caps) > m * window.total:  # unbounded already: not a matter of memory (cannot happen)
                raise
            caps = [c + 1 for c in caps]


def check_order(orders: Sequence[Sequence[Op]], p: int, m: int, window: BackpropWindow) -> None:
    """Raise AssertionError unless every stage runs exactly its ops and the orders can be executed together
    (every op's inputs are produced before it, with no cyclic waits between stages)."""
    assert len(orders) == p, f"{len(orders)} stage orders for p={p}"
    for s in range(p):
        want, got = sorted(expected_ops(s, p, m, window)), sorted(orders[s])
        assert got == want, f"stage {s}: ops differ from the required set: missing {sorted(set(want) - set(got))[:5]}, " \
                            f"extra/duplicated {[o for o in got if got.count(o) != want.count(o)][:5]}"
    _execute(orders, p, window)


def _execute(orders: Sequence[Sequence[Op]], p: int, window: BackpropWindow) -> dict:
    """Run the orders in logical time: start = max(stage free, end of every input), returning
    {(stage, op): (start, end)}; AssertionError on a dependency that is never satisfied."""
    pos, free = [0] * p, [0.0] * p
    times: dict[tuple[int, Op], tuple[float, float]] = {}
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for s in range(p):
            while pos[s] < len(orders[s]):
                op = orders[s][pos[s]]
                deps = op_inputs(op, s, p, window)
                if not all(d in times for d in deps):
                    break
                start = max([free[s]] + [times[d][1] for d in deps])
                end = start + DURATION[op.kind]
                times[(s, op)] = (start, end)
                free[s] = end
                pos[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            blocked = {s: orders[s][pos[s]] for s in range(p) if pos[s] < len(orders[s])}
            raise AssertionError(f"orders cannot complete: each stage waits on another: {blocked}")
    return times


def simulate_timeline(orders: Sequence[Sequence[Op]], p: int, window: BackpropWindow) -> list[TimelineSlot]:
    """The logical-time timeline of executing `orders` (what `LoopedPipelineSchedule.timeline` records)."""
    times = _execute(orders, p, window)
    return [TimelineSlot(s, op.kind, op.micro_batch, op.iteration, *times[(s, op)])
            for s in range(p) for op in orders[s]]


def timeline_bubble(timeline: Sequence[TimelineSlot], p: int) -> float:
    """Idle time over all stages / (p * makespan)."""
    if not timeline:
        return 0.0
    t0 = min(sl.start for sl in timeline)
    makespan = max(sl.end for sl in timeline) - t0
    busy = sum(sl.end - sl.start for sl in timeline)
    return 1.0 - busy / (p * makespan) if makespan > 0 else 0.0


def max_in_flight(orders: Sequence[Sequence[Op]]) -> list[int]:
    """Per stage: the most grad chunks holding activations at once (F done, B not yet)."""
    out = []
    for order in orders:
        cur = peak = 0
        for op in order:
            cur += (op.kind == "F") - (op.kind == "B")
            peak = max(peak, cur)
        out.append(peak)
    return out


# ---------------------------------------------------------------------------------------------------------
# messages between stages


def produced_message(op: Op, stage: int, p: int, window: BackpropWindow) -> Optional[tuple[int, tuple]]:
    """(destination stage, key) of what `op` on `stage` sends, or None. Keys: ("f", mb, j) = state after
    iteration j's chunk on the sender; ("b", mb, j) = grad wrt the input of the sender's chunk of iteration j."""
    r, n = window.total, window.no_grad
    mb, j = op.micro_batch, op.iteration
    if op.kind in "fF":
        if stage < p - 1:
            return stage + 1, ("f", mb, j)
        return (0, ("f", mb, j)) if j < r else None
    if op.kind == "B":
        if stage > 0:
            return stage - 1, ("b", mb, j)
        return (p - 1, ("b", mb, j)) if j > n + 1 else None
    return None


def needed_message(op: Op, stage: int, p: int, window: BackpropWindow) -> Optional[tuple[int, tuple]]:
    """(source stage, key) of the message `op` on `stage` consumes, or None (E, H, local inputs)."""
    r = window.total
    mb, j = op.micro_batch, op.iteration
    if op.kind in "fF":
        if stage > 0:
            return stage - 1, ("f", mb, j)
        return (p - 1, ("f", mb, j - 1)) if j > 1 else None
    if op.kind == "B":
        if stage < p - 1:
            return stage + 1, ("b", mb, j)
        return (0, ("b", mb, j + 1)) if j < r else None
    return None


def message_tag(key: tuple, r: int, time: bool = False) -> int:
    """Unique per (direction, micro-batch, iteration) within a run; the logical-time companion gets +1."""
    direction, mb, j = key
    return ((mb * (r + 1) + j) * 2 + (direction == "b")) * 2 + int(time)


class LoopedPipelineSchedule:
    """Runs one optimizer step's micro-batches through the ring of stages; see the module docstring.

    `stage`: this rank's `LoopedStage`; `pp_group`: the pipeline group (stage index = rank in the group,
    stage 0 = first); `tensor_shape`/`dtype`: of the state passed between stages ([s, b, h]).
    `record_timeline` (same on every stage) keeps `timeline` and `bubble_fraction()` for the last run.
    """

    LOOKAHEAD = 2  # receives are posted for the inputs of the current and the next LOOKAHEAD ops

    def __init__(self, stage: LoopedStage, pp_group, tensor_shape: tuple, dtype: torch.dtype, device,
                 record_timeline: bool = True):
        self.stage, self.group = stage, pp_group
        self.tensor_shape, self.dtype, self.device = tuple(tensor_shape), dtype, torch.device(device)
        self.record_timeline = record_timeline
        self.p = dist.get_world_size(pp_group)
        self.rank = dist.get_rank(pp_group)
        self.ranks = dist.get_process_group_ranks(pp_group)
        if bool(stage.is_first) != (self.rank == 0) or bool(stage.is_last) != (self.rank == self.p - 1):
            raise ValueError(f"stage {self.rank} of {self.p}: is_first={stage.is_first}, is_last={stage.is_last} "
                             "do not match its rank in the pipeline group")
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

    def run(self, micro_batches: list, window: BackpropWindow, loss_fn: Callable[[Tensor, object], Tensor]) -> Tensor:
        m = len(micro_batches)
        orders = self.orders(m, window)
        self.last_orders = orders
        run = _Run(self, orders, micro_batches, window, loss_fn)
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

    def __init__(self, sched: LoopedPipelineSchedule, orders, micro_batches, window: BackpropWindow, loss_fn):
        self.s, self.orders, self.mbs, self.window, self.loss_fn = sched, orders, micro_batches, window, loss_fn
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
        self.head_grad: dict[int, Tensor] = {}
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
        leftovers = (self.acts, self.e, self.head_grad, self.local, self.posted)
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
        if op.kind == "f":
            with torch.no_grad():
                out = st.core_chunk(x, e)
        else:
            # the first grad iteration's input on stage 0 is the truncation point: no grad flows into it
            x = x.detach().requires_grad_(not (self.me == 0 and j == self.window.no_grad + 1))
            with torch.enable_grad():
                out = st.core_chunk(x, e)
            self.acts[(mb, j)] = (x, out)
        end = self._clock(op, arrival)
        if produced_message(op, self.me, self.p, self.window) is not None:
            self._send(op, out, end)
        if self.me == self.p - 1 and j == self.window.total:
            self.head_input = out
        if self.me == 0 and j == self.window.total and not self.grad:
            del self.e[mb]  # forward only: e is not needed after the last trip

    def _op_H(self, op: Op, st) -> None:
        mb = self.mbs[op.micro_batch]
        out = self.head_input
        del self.head_input
        x = out.detach().requires_grad_(self.grad)
        with torch.set_grad_enabled(self.grad):
            loss = self.loss_fn(st.head(x, mb.labels), mb)
        if self.grad:
            torch.autograd.backward(loss)
            self.head_grad[op.micro_batch] = x.grad if x.grad is not None else torch.zeros_like(x)
        self.total = loss.detach() if not self.total_set else self.total + loss.detach()
        self.total_set = True
        self._clock(op, None)

    def _op_B(self, op: Op, st) -> None:
        mb, j = op.micro_batch, op.iteration
        if self.me == self.p - 1 and j == self.window.total:
            grad_out, arrival = self.head_grad.pop(mb), None
        else:
            grad_out, arrival = self._receive(op)
        x, out = self.acts.pop((mb, j))
        torch.autograd.backward(out, grad_out)
        if self.me == 0 and j == self.window.no_grad + 1:  # the micro-batch's last backward trip on stage 0
            e, e_leaf = self.e.pop(mb)
            if e_leaf.grad is not None and e.requires_grad:
                torch.autograd.backward(e, e_leaf.grad)
        end = self._clock(op, arrival)
        if produced_message(op, self.me, self.p, self.window) is not None:
            self._send(op, x.grad if x.grad is not None else torch.zeros_like(x), end)
