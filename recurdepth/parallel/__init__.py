"""Parallelism specific to looped models: the recurrence-aware pipeline schedule as pure arithmetic (`schedule`,
torch-free), its executor over torch.distributed (`pipeline`), the naive baseline split (`naive`) and the
autograd-aware stage-to-stage transport for multi-pass objectives (`passes`). Import the submodule you need;
this package imports nothing, so the planner can read the schedule without torch."""
