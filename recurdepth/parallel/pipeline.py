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
(j = r .. r-k+1). Each stage interleaves the two sequences greedily in logical time (F/f = 1 unit, B = 2,
E/H = 0, communication free): when the stage is free it runs the next B if its gradient has arrived, else
the next forward if its input has arrived and (for "F") fewer than `cap` chunks hold activations, else it
idles until one becomes ready. That yields warm-up (forwards of the first group(s) until the first
gradient comes back round the ring), a steady state where B's (every 2 units) and forwards of the next
group alternate as they become ready, and a cool-down of B's. `build_order` runs that simulation once,
globally, and returns each stage's op order; the executor then simply follows its order, so the
timeline it records (each op starts at max(stage free, arrival of its input), arrival = the logical end
time carried by the message) reproduces the simulated one exactly.

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
host-device sync; the finished timeline is all-gathered over `pp_group` once per `run`.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
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
    r, n = window.total, window.no_grad
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
    """Chunks holding activations on `stage` before it must wait for a backward: a full group's grad chunks
    (p k) plus the forwards it can run while the first gradient travels back to it (2 units per hop)."""
    return p * window.with_grad + 2 * (p - 1 - stage) + 1


class ScheduleDeadlock(RuntimeError):
    pass


def _greedy(p: int, m: int, window: BackpropWindow, caps: Sequence[int]) -> tuple[list[list[Op]], dict]:
    r, n, k = window.total, window.no_grad, window.with_grad
    fseq, bseq = forward_sequence(p, m, r), backward_sequence(p, m, window)
    orders: list[list[Op]] = [[] for _ in range(p)]
    ends: dict[tuple[int, Op], float] = {}
    fi, bi, inflight = [0] * p, [0] * p, [0] * p
    time = [0.0] * p
    total = [len(fseq) + len(bseq) for _ in range(p)]

    def ready(s: int, op: Op, t: float) -> bool:
        for dep in op_inputs(op, s, p, window):
            if dep[1].kind == "E" or (dep[1].kind == "H"):
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

    def decide(s: int, t: float) -> Optional[Op]:
        if bi[s] < len(bseq):
            mb, j = bseq[bi[s]]
            op = Op("B", mb, j)
            if (s, Op("F", mb, j)) in ends and ready(s, op, t):
                bi[s] += 1
                inflight[s] -= 1
                return op
        if fi[s] < len(fseq):
            mb, j = fseq[fi[s]]
            op = Op(_fkind(window, j), mb, j)
            if ready(s, op, t) and (op.kind == "f" or inflight[s] < caps[s]):
                fi[s] += 1
                inflight[s] += op.kind == "F"
                return op
        return None

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
    local_done: list[set] = [set() for _ in range(p)]
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
                local_done[s].add(op)
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
