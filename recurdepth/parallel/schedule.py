"""The recurrence-aware pipeline schedule as pure arithmetic: which op each stage runs when, what it sends and
receives, and what bubble that costs. No processes, no torch.distributed, no torch: `build_order`, the
message rules and the bubble formulas are importable by the planner (`recurdepth plan`) and testable alone.
The executor that follows these orders over torch.distributed is `recurdepth/parallel/pipeline.py`, whose
docstring explains the schedule in full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

from recurdepth.model.depth import BackpropWindow

DURATION = {"E": 0.0, "H": 0.0, "f": 1.0, "F": 1.0, "B": 2.0}


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
    grad_iterations = [it.index for it in window.iterations() if it.grad][::-1]  # backward: the last first
    seq = []
    for g0 in range(0, m, p):
        group = range(g0, min(g0 + p, m))
        for j in grad_iterations:
            seq.extend((mb, j) for mb in group)
    return seq


def _fkind(window: BackpropWindow, j: int) -> str:
    return "F" if window.grad_at(j) else "f"


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
    ops = []
    for mb in range(m):
        if stage == 0:
            ops.append(Op("E", mb, 0))
        ops.extend(Op("F" if it.grad else "f", mb, it.index) for it in window.iterations())
        if stage == p - 1:
            ops.append(Op("H", mb, window.total))
        ops.extend(Op("B", mb, it.index) for it in window.iterations() if it.grad)
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


def _replay(orders: Sequence[Sequence], p: int, inputs, duration, what: str = "orders") -> dict:
    """Run per-stage op orders in logical time: an op starts at max(its stage free, the end of every op in
    `inputs(stage, index, op)` (keys `(stage, index)`)) and lasts `duration(op)`; returns {(stage, index): (start,
    end)}. AssertionError when every stage waits on another (a dependency never satisfied)."""
    pos, free = [0] * p, [0.0] * p
    times: dict[tuple[int, int], tuple[float, float]] = {}
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for s in range(p):
            while pos[s] < len(orders[s]):
                op = orders[s][pos[s]]
                deps = inputs(s, pos[s], op)
                if not all(d in times for d in deps):
                    break
                start = max([free[s]] + [times[d][1] for d in deps])
                times[(s, pos[s])] = (start, start + duration(op))
                free[s] = start + duration(op)
                pos[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            blocked = {s: orders[s][pos[s]] for s in range(p) if pos[s] < len(orders[s])}
            raise AssertionError(f"{what} cannot complete: each stage waits on another: {blocked}")
    return times


def _execute(orders: Sequence[Sequence[Op]], p: int, window: BackpropWindow) -> dict:
    """Run the orders in logical time: start = max(stage free, end of every input), returning
    {(stage, op): (start, end)}; AssertionError on a dependency that is never satisfied."""
    index = [{op: i for i, op in enumerate(order)} for order in orders]

    def inputs(s: int, _i: int, op: Op) -> list:
        return [(d, index[d][dep]) if dep in index[d] else (d, -1) for d, dep in op_inputs(op, s, p, window)]

    times = _replay(orders, p, inputs, lambda op: DURATION[op.kind])
    return {(s, orders[s][i]): t for (s, i), t in times.items()}


def simulate_timeline(orders: Sequence[Sequence[Op]], p: int, window: BackpropWindow) -> list[TimelineSlot]:
    """The logical-time timeline of executing `orders` (what `LoopedPipelineSchedule.timeline` records)."""
    times = _execute(orders, p, window)
    return [TimelineSlot(s, op.kind, op.micro_batch, op.iteration, *times[(s, op)])
            for s in range(p) for op in orders[s]]


def recorded_timeline(stage_ops: Sequence[Sequence], p: int) -> list[TimelineSlot]:
    """The logical-time timeline of what the stages recorded running (`parallel.passes.StageRecorder`: per stage,
    ops `[kind, micro_batch, pass, iteration, needed messages, produced messages]` in the order they ran): each op
    starts at max(its stage free, the end of the ops that produced the messages it needed) and lasts its kind's
    `DURATION` (F/f = 1, B = 2), the looped schedule's convention. Slots carry (micro-batch, iteration)."""
    producer = {tuple(message): (s, i) for s, ops in enumerate(stage_ops) for i, op in enumerate(ops)
                for message in op[5]}

    def inputs(_s: int, _i: int, op) -> list:
        return [producer[tuple(msg)] for msg in op[4] if tuple(msg) in producer]

    times = _replay(stage_ops, p, inputs, lambda op: DURATION[op[0]], what="recorded ops")
    return [TimelineSlot(s, op[0], op[1], op[3], *times[(s, i)]) for s, ops in enumerate(stage_ops)
            for i, op in enumerate(ops)]


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
    mb, j = op.micro_batch, op.iteration
    if op.kind in "fF":
        if stage < p - 1:
            return stage + 1, ("f", mb, j)
        return (0, ("f", mb, j)) if not window.iteration(j).last else None
    if op.kind == "B":
        if stage > 0:
            return stage - 1, ("b", mb, j)
        # stage 0 -> the last stage across iterations, except at the truncation point (nothing flows into it)
        return (p - 1, ("b", mb, j)) if not window.iteration(j).first_grad else None
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
