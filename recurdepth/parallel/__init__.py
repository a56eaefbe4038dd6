"""Parallelism specific to looped models: the recurrence-aware pipeline schedule (`pipeline`)."""

from recurdepth.parallel.pipeline import (
    LoopedPipelineSchedule,
    LoopedStage,
    Op,
    TimelineSlot,
    build_order,
    check_order,
    expected_bubble,
    expected_bubble_window,
    simulate_timeline,
    timeline_bubble,
)

__all__ = [
    "LoopedPipelineSchedule", "LoopedStage", "Op", "TimelineSlot", "build_order", "check_order",
    "expected_bubble", "expected_bubble_window", "simulate_timeline", "timeline_bubble",
]
