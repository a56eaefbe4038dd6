"""`recurdepth bench step`: tokens/s, achieved FLOP/s and MFU/HFU of the real training step (`Trainer.train_step`:
data, forward/backward over the micro-batches, gradient reduction, numerical guard, optimizer and schedule).

Conventions. Model FLOPs per token are recurdepth/train/flops.py's, at the step's own r and k:
3 (F_prelude + F_coda + F_head) + (r + 2 min(r, k)) F_core, matmuls only, attention over the full s x s
square (megatron's convention). MFU = model FLOPs / step seconds / peak (no recompute counted); HFU also
counts the core forwards that `recurrence.checkpoint_iterations` re-runs. The peak is the best FLOP/s of a
large square `torch.mm` (fp32 on CPU, bf16 on GPU) measured in the same process with the same threads, sampled
before and between the timed steps; "AFU" in the issue and docs is MFU measured this way. One process; the
first `--warmup` steps (allocations, optimizer state, compilation) are not timed. Under torchrun (data
parallel) the step's tokens and FLOPs are the global batch's and the peak is the sum of every rank's own.
"""

from __future__ import annotations

import os

import torch

from recurdepth.bench.harness import QUICK_OVERRIDES, PeakSampler, bench_trainer, best_and_median, set_threads


def run_step_bench(args) -> int:
    threads = set_threads(args.threads)
    overrides = (QUICK_OVERRIDES if args.quick else []) + list(args.overrides)
    steps, warmup = (2, 1) if args.quick else (args.steps, args.warmup)
    if getattr(args, "precisions", None):
        return _precision_bench(args, overrides, steps, warmup, threads)
    if getattr(args, "versus", None):
        return _versus_bench(args, overrides, steps, warmup, threads)
    trainer = bench_trainer(args.config, overrides, steps + warmup)
    cfg = trainer.cfg
    world = torch.distributed.get_world_size()
    plain = _plain_baseline(trainer) if world == 1 else None
    huginn, huginn_params = (None, 0)
    if getattr(args, "huginn", None) and world == 1:
        from recurdepth.bench.reference import huginn_baseline

        huginn, huginn_params = huginn_baseline(trainer, args.huginn)
    for _ in range(warmup):
        m = trainer.train_step()
        if plain is not None:
            plain(m.depth, m.backprop_depth)
        if huginn is not None:
            huginn(m.depth, m.backprop_depth)
    peak = PeakSampler(trainer.dtype, quick=args.quick)
    peak.sample(repeats=3)
    rows, plain_seconds, huginn_seconds = [], [], []
    for _ in range(steps):
        m = trainer.train_step()
        hw = m.tokens * trainer.flops.per_token(m.depth, cfg.recurrence.backprop_depth,
                                                recompute=cfg.recurrence.checkpoint_iterations)
        rows.append((m.depth, m.backprop_depth, m.tokens, m.seconds, m.flops, hw))
        if plain is not None:  # interleaved: the same machine state for both, step by step
            plain_seconds.append(plain(m.depth, m.backprop_depth))
        if huginn is not None:
            huginn_seconds.append(huginn(m.depth, m.backprop_depth))
        peak.sample()
    peak.keep()
    if world > 1:  # tokens and FLOPs are the global batch's: against the peaks of all ranks, each measured by itself
        total = torch.tensor([peak.best], dtype=torch.float64)
        torch.distributed.all_reduce(total)
        peak.samples.append(total.item())  # becomes `best`: the ranks' peaks summed
    if torch.distributed.get_rank() != 0:
        return 0
    print(_header(trainer, threads, steps, warmup))
    print(peak.describe() if world == 1 else
          f"peak = sum over {world} ranks of each rank's peak (cached or this run's, {threads} threads each): "
          f"{peak.best / 1e9:.1f} GFLOP/s")
    print(f"{'step':>6} {'r':>4} {'k':>3} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'GFLOP/s':>8} "
          f"{'MFU':>7} {'HFU':>7}")
    for i, (r, k, tokens, sec, flops, hw) in enumerate(rows, 1):
        print(_row(str(i), r, k, tokens, sec, flops, hw, peak.best))
    # best = the step with the highest achieved FLOP/s (the fastest one when r is fixed); median = the median step
    # time at the mean FLOPs per step (they differ only when r is sampled)
    best = max(rows, key=lambda row: row[4] / row[3])
    mean = lambda i: sum(row[i] for row in rows) / len(rows)  # noqa: E731
    print(_row("best", *best, peak.best))
    print(_row("median", "", "", mean(2), best_and_median([row[3] for row in rows])[1], mean(4), mean(5), peak.best))
    if plain is not None:
        print(_plain_table(rows, plain_seconds))
    if getattr(args, "profile", False) and plain is not None:
        print(_profile_table(trainer, plain))
    if huginn is not None:
        ours_params = sum(p.numel() for p in trainer.engine.module.parameters())
        print(_plain_table(rows, huginn_seconds, label="huginn",
                           title=f"Huginn's published modeling code (--huginn {args.huginn}; {huginn_params:,} "
                                 f"parameters, ours {ours_params:,}), interleaved; speed = huginn s / recurdepth s"))
    return 0


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_precisions(text: str) -> list:
    """`fp32,bf16` -> ["fp32", "bf16"]: two or more distinct names of PRECISIONS, or one error line."""
    from recurdepth.errors import RecurdepthError

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PRECISIONS]
    if unknown or len(set(names)) < 2 or len(set(names)) != len(names):
        raise RecurdepthError(f"--precisions {text!r}: give two or more distinct precisions from "
                              f"{', '.join(PRECISIONS)}, comma-separated, e.g. --precisions fp32,bf16")
    return names


def _precision_bench(args, overrides: list, steps: int, warmup: int, threads: int) -> int:
    """The same config trained in each precision of `--precisions` (one trainer each, same data and seed), their
    steps interleaved (fp32 step 1, bf16 step 1, fp32 step 2, ...) so that both see the same machine state; each
    precision's MFU is against the mm peak of its own dtype. Speed = first precision's seconds / this one's."""
    names = parse_precisions(args.precisions)
    return _interleaved_bench(args, "--precisions", "precision",
                              {n: overrides + [f"train.precision={n}"] for n in names}, steps, warmup, threads)


def _versus_bench(args, overrides: list, steps: int, warmup: int, threads: int) -> int:
    """The config as given ("base") and with `--versus`'s overrides on top ("versus"), steps interleaved; speed =
    base seconds / versus seconds, and the FLOPs each step counts (a router's skipped tokens are not counted)."""
    import shlex

    extra = shlex.split(args.versus)
    print(f"versus = base + {' '.join(extra)}")
    return _interleaved_bench(args, "--versus", "variant", {"base": overrides, "versus": overrides + extra},
                              steps, warmup, threads)


def _interleaved_bench(args, flag: str, column: str, variants: dict, steps: int, warmup: int, threads: int) -> int:
    """One trainer per variant (name -> overrides; same data and seed), their steps interleaved so that all see
    the same machine state; each variant's MFU against the mm peak of its own dtype."""
    from recurdepth.errors import RecurdepthError
    from recurdepth.precision import cpu_bf16_native

    names = list(variants)
    if getattr(args, "huginn", None) or getattr(args, "profile", False):
        raise RecurdepthError(f"{flag} times recurdepth's own step only; run --huginn or --profile separately")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RecurdepthError(f"{flag} runs in one process; start it without torchrun")
    trainers = {n: bench_trainer(args.config, o, steps + warmup) for n, o in variants.items()}
    for _ in range(warmup):
        for trainer in trainers.values():
            trainer.train_step()
    peaks = {n: PeakSampler(t.dtype, quick=args.quick) for n, t in trainers.items()}
    for p in peaks.values():
        p.sample(repeats=3)
    rows = {n: [] for n in names}
    for _ in range(steps):
        for n, trainer in trainers.items():
            m = trainer.train_step()
            rows[n].append((m.depth, m.backprop_depth, m.tokens, m.seconds, m.flops))
        for p in peaks.values():
            p.sample()
    for p in peaks.values():
        p.keep()
    first = trainers[names[0]]
    header = _header(first, threads, steps, warmup)
    dtypes = {str(t.dtype).replace("torch.", "") for t in trainers.values()}
    print(header.replace(str(first.dtype).replace("torch.", ""), "/".join(names), 1) if len(dtypes) > 1 else header)
    device = first.device.type
    if device == "cpu":
        print(f"this CPU: torch capability {torch.backends.cpu.get_cpu_capability()}, bf16 matmuls "
              f"{'in hardware (AVX-512 BF16 / AMX)' if cpu_bf16_native() else 'emulated (no AVX-512 BF16 / AMX)'}")
    for n in names:
        print(f"{n}: {peaks[n].describe()}")
    print(f"{column:>9} {'step':>5} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'MFU':>7} "
          f"{'speed vs ' + names[0]:>14}")
    base = [row[3] for row in rows[names[0]]]
    for n in names:
        for i, (r, k, tokens, sec, flops) in enumerate(rows[n], 1):
            print(f"{n:>9} {i:>5} {tokens:>8,.0f} {sec:>8.2f} {tokens / sec:>9,.0f} {flops / sec / 1e9:>8.1f} "
                  f"{flops / sec / peaks[n].best:>7.3f} {base[i - 1] / sec:>14.3f}")
    for n in names:
        secs = [row[3] for row in rows[n]]
        best, median = best_and_median(secs)
        tokens, flops = rows[n][0][2], sum(row[4] for row in rows[n]) / len(rows[n])
        print(f"{n:>9} {'med.':>5} {tokens:>8,.0f} {median:>8.2f} {tokens / median:>9,.0f} "
              f"{flops / median / 1e9:>8.1f} {flops / median / peaks[n].best:>7.3f} "
              f"{best_and_median(base)[1] / median:>14.3f}")
    for n in names[1:]:  # the same steps' FLOPs: how much of the base's work the variant's step counts
        print(f"{n}: {sum(row[4] for row in rows[n]) / sum(row[4] for row in rows[names[0]]):.3f}x the model "
              f"FLOPs of {names[0]} per step")
    return 0


def _plain_baseline(trainer):
    """`run(r, k) -> seconds` of one plain-PyTorch step (bench/plain.py) on this run's first global batch, or None
    (with a note) when the config uses an option the baseline does not implement."""
    import time

    from recurdepth.bench.plain import PlainStep
    from recurdepth.data.pipeline import micro_batches

    t = trainer.cfg.train
    try:
        step = PlainStep(trainer.cfg, trainer.engine.module.vocab_size, trainer.dtype)
    except ValueError as exc:  # an option the baseline does not have: no ratio, said in one line, not a wrong one
        print(f"note: no plain-PyTorch baseline in this run: {exc}", flush=True)
        return None
    step.model.to(trainer.device)
    batches = micro_batches(trainer.data.train, 0, t.global_batch_size, t.micro_batch_size, 0, 1, trainer.device)

    def run(r: int, k: int) -> float:
        start = time.perf_counter()
        step(batches, r, k)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return run


def _profile_table(trainer, plain, steps: int = 2, top: int = 14) -> str:
    """Where each millisecond of a step goes: torch.profiler over `steps` more steps of recurdepth, then as many
    plain-PyTorch steps at the same r and k; self time per op in ms per step, the ops of either's top `top`."""
    from torch.profiler import ProfilerActivity, profile

    def run(fn) -> dict:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                                          else [])) as prof:
            for _ in range(steps):
                fn()
        key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        return {e.key: getattr(e, key) / 1e3 / steps for e in prof.key_averages()}

    windows = iter([trainer.sampler.window(trainer.state.step + i) for i in range(steps)])  # ours will draw these

    def plain_step() -> None:
        window = next(windows)
        plain(window.total, window.with_grad)

    ours = run(trainer.train_step)
    base = run(plain_step)
    names = sorted(set(sorted(ours, key=ours.get)[-top:]) | set(sorted(base, key=base.get)[-top:]),
                   key=lambda n: -max(ours.get(n, 0.0), base.get(n, 0.0)))
    lines = [f"profile (torch.profiler, self time, ms per step, {steps} more steps each at the same r and k)",
             f"{'op':<58} {'recurdepth':>11} {'plain':>9} {'diff':>9}"]
    for n in names:
        a, b = ours.get(n, 0.0), base.get(n, 0.0)
        lines.append(f"{n[:58]:<58} {a:>11.1f} {b:>9.1f} {a - b:>+9.1f}")
    total_a, total_b = sum(ours.values()), sum(base.values())
    lines.append(f"{'total (all ops)':<58} {total_a:>11.1f} {total_b:>9.1f} {total_a - total_b:>+9.1f}")
    return "\n".join(lines)


def _plain_table(rows: list, other_seconds: list, label: str = "plain", title: str | None = None) -> str:
    """The same steps' seconds of recurdepth and of a baseline run interleaved with them (default the plain-PyTorch
    one, bench/plain.py); speed = baseline seconds / recurdepth seconds (> 1: recurdepth is faster)."""
    title = title or ("plain-PyTorch baseline (bench/plain.py: same shapes and micro-batches, torch AdamW, no "
                      "megatron), interleaved with the steps above; speed = plain s / recurdepth s")
    lines = [title, f"{'':>6} {'step':>5} {'recurdepth s':>13} {label + ' s':>9} {'speed':>7}"]
    for i, (row, other) in enumerate(zip(rows, other_seconds), 1):
        lines.append(f"{label:>6} {i:>5} {row[3]:>13.2f} {other:>9.2f} {other / row[3]:>7.3f}")
    best, median = best_and_median([row[3] for row in rows]), best_and_median(other_seconds)
    lines.append(f"{label:>6} {'best':>5} {best[0]:>13.2f} {median[0]:>9.2f} {median[0] / best[0]:>7.3f}")
    lines.append(f"{label:>6} {'med.':>5} {best[1]:>13.2f} {median[1]:>9.2f} {median[1] / best[1]:>7.3f}")
    return "\n".join(lines)


def _header(trainer, threads: int, steps: int, warmup: int) -> str:
    cfg, m = trainer.cfg, trainer.cfg.model
    t = cfg.train
    compiled = ", torch.compile" if getattr(t, "compile", False) else ""
    return (f"training step: h={m.hidden_size}, seq {m.seq_length}, P{m.prelude_layers}+R{m.core_layers}xr+"
            f"C{m.coda_layers}, global batch {t.global_batch_size} in micro-batches of {t.micro_batch_size}, "
            f"{trainer.device.type} {str(trainer.dtype).replace('torch.', '')}{compiled}, {threads} threads"
            f"{f' x {trainer.dp_size} data-parallel ranks' if trainer.dp_size > 1 else ''}; "
            f"{steps} timed steps after {warmup} warm-up\n"
            f"MFU = model FLOPs (flops.py: 3(F_prelude+F_coda+F_head) + (r+2min(r,k)) F_core, no recompute) / s / "
            f"peak; HFU adds recomputed core forwards (recurrence.checkpoint_iterations="
            f"{str(cfg.recurrence.checkpoint_iterations).lower()})")


def _row(label, r, k, tokens, seconds, flops, hw_flops, peak) -> str:
    return (f"{label:>6} {r:>4} {k:>3} {tokens:>8,.0f} {seconds:>8.2f} {tokens / seconds:>9,.0f} "
            f"{flops / seconds / 1e9:>8.1f} {flops / seconds / peak:>7.3f} {hw_flops / seconds / peak:>7.3f}")
