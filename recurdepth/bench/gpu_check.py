"""`recurdepth bench gpu-check [--quick]`: the GPU acceptance checks, one table (check | result | figure | status).

    te-vs-local     the TransformerEngine and local layer specs with the same weights (norms perturbed off 1, so a
                    swapped norm would show) agree in forward and backward: logits and every gradient, max |a - b|
                    over max |b| (bf16)
    train-step      a training step of the ~1B looped model (`Trainer.train_step`): tokens/s, and MFU against the
                    matmul peak in the step's dtype measured in this run (`recurdepth/peak.py`)
    compile         the same step with `train.compile=true`: tokens/s vs eager, and its first loss equals eager's
    ckpt-te-local   a checkpoint saved by a TE-spec trainer (`Trainer.save`) loads with `model.spec=local`
                    (`infer/loading.load_model`): every tensor bit-equal, the logits within the specs' tolerance
    decode          the KV-cached decoder (`infer/decoder.py`) on the trained 1B model equals its own forward
                    (prefill, then one token at a time); `generate`'s tokens/s
    quiet-star      a Quiet-STaR training step (`objective.kind=quiet_star`, configs/quiet-star.yaml) runs, loss finite

Without CUDA or without transformer_engine the TE checks say so and are skipped; their code path still runs with
the local spec on both sides (a stand-in that must agree exactly), so CI (`--quick`, tiny shapes, CPU) keeps it
working. Everything runs in one process (imports cost seconds on a small CPU); a check that raises is a FAIL row
with its traceback on stderr, and the others still run. The full run (one H100/H200) is sized to finish in
about 8 minutes; `--budget` skips the checks that would start after it.
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from recurdepth.bench.harness import QUICK_OVERRIDES, bench_trainer
from recurdepth.bench.names import GPU_CHECKS as CHECKS
from recurdepth.model.depth import BackpropWindow

ROOT = Path(__file__).resolve().parents[2]
BENCH_CONFIG = str(ROOT / "configs" / "bench.yaml")
QUIET_STAR_CONFIG = str(ROOT / "configs" / "quiet-star.yaml")
NO_TE = "transformer_engine not installed / no CUDA: skipped"
# ~1B parameters (recurdepth.plan.shape.total_params: 0.93B with the byte tokenizer): P2 + R4 x r + C2 at h=3072
BIG = ["model.hidden_size=3072", "model.num_heads=24", "model.prelude_layers=2", "model.core_layers=4",
       "model.coda_layers=2", "model.seq_length=2048", "recurrence.sampler=fixed", "recurrence.depth=8",
       "recurrence.backprop_depth=4", "train.global_batch_size=8", "train.micro_batch_size=2", "train.precision=bf16"]
# the agreement and checkpoint checks compare numerics, not speed: a mid-sized model
MID = ["model.hidden_size=1024", "model.num_heads=8", "model.prelude_layers=1", "model.core_layers=2",
       "model.coda_layers=1", "model.seq_length=512", "recurrence.sampler=fixed", "recurrence.depth=4",
       "recurrence.backprop_depth=2", "train.global_batch_size=4", "train.micro_batch_size=2", "train.precision=bf16"]
TINY = QUICK_OVERRIDES + ["model.seq_length=32"]
QUIET_STAR_GPU = ["model.hidden_size=1024", "model.num_heads=8", "model.seq_length=256",
                  "train.global_batch_size=8", "train.micro_batch_size=4"]
# max |a - b| / max |b| allowed between the TE and local specs (different fused kernels, bf16 rounding at every op;
# a wrong weight or a swapped norm is off by O(1)); the local stand-in computes the same thing and must agree exactly
TOLERANCE = {"logits": 3e-2, "grads": 1e-1, "decode": 5e-2, "compile_loss": 2e-2}
FP32_TOLERANCE = {"logits": 1e-6, "grads": 1e-5, "decode": 1e-4, "compile_loss": 1e-4}


@dataclass
class Row:
    check: str
    result: str
    figure: str = ""
    status: str = "ok"  # ok | skip | FAIL
    seconds: float = 0.0


@dataclass
class Mode:
    """What one run measures: shapes (dotted overrides) and step counts."""

    big: list
    mid: list
    quiet_star: list
    steps: int
    warmup: int
    decode: tuple  # (batch, prompt ids, new tokens)


QUICK = Mode(TINY, TINY, [], steps=1, warmup=1, decode=(2, 4, 4))
FULL = Mode(BIG, MID, QUIET_STAR_GPU, steps=3, warmup=2, decode=(8, 128, 64))


def te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64 (0 when both are zero)."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale else (a - b).abs().max().item()


class Run:
    """State shared by the checks of one run: the mode, whether TE runs, the eager step's figures."""

    def __init__(self, mode: Mode, budget: float):
        self.mode, self.budget, self.start = mode, budget, time.perf_counter()
        self.te = te_available()
        self.spec = "te" if self.te else "local"
        self.tol = TOLERANCE if torch.cuda.is_available() else FP32_TOLERANCE
        self.eager = None  # (tokens/s, first loss) of the train-step check, for compile's comparison
        self.trainer = None  # the train-step check's trainer, decoded by the decode check, then freed

    def overrides(self, shape: list, compile: bool = False) -> list:
        return list(shape) + [f"model.spec={self.spec}", f"train.compile={str(compile).lower()}"]


# ---------------------------------------------------------------- the checks


def check_te_vs_local(run: Run) -> Row:
    from recurdepth.config import load_config
    from recurdepth.infer.loading import init_single_process
    from recurdepth.model.build import build_model
    from recurdepth.model.names import local_name, to_spec, with_extra_state

    cfg = load_config(BENCH_CONFIG, run.overrides(run.mode.mid))
    device = init_single_process(cfg)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = 384
    a = _perturbed(build_model(cfg, vocab, dtype, device))  # the TE spec (the stand-in: local)
    cfg.model.spec = "local"
    b = build_model(cfg, vocab, dtype, device)
    b.load_state_dict(with_extra_state(b, to_spec(a.state_dict(), b.state_dict().keys())))
    r, k = cfg.recurrence.depth, cfg.recurrence.backprop_depth
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (cfg.train.micro_batch_size, cfg.model.seq_length), generator=g).to(device)
    s0 = torch.randn(x.shape[1], x.shape[0], cfg.model.hidden_size, generator=g).to(device, dtype)
    out = {}
    for name, model in (("a", a), ("b", b)):
        logits = model(x, window=BackpropWindow(r, k), s0=s0)
        torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten()).backward()
        out[name] = (logits, {local_name(n): p.grad for n, p in model.named_parameters() if p.grad is not None})
    logits_diff = relative_diff(out["a"][0], out["b"][0])
    grads_a, grads_b = out["a"][1], out["b"][1]
    if sorted(grads_a) != sorted(grads_b):
        return Row("te-vs-local", f"parameter sets differ: {sorted(set(grads_a) ^ set(grads_b))[:4]}", "", "FAIL")
    worst = max(grads_b, key=lambda n: relative_diff(grads_a[n], grads_b[n]))
    grads_diff = relative_diff(grads_a[worst], grads_b[worst])
    ok = logits_diff <= run.tol["logits"] and grads_diff <= run.tol["grads"]
    figure = f"logits {logits_diff:.1e}, grads {grads_diff:.1e}" + (f" (worst {worst})" if grads_diff else "")
    shape = _shape(cfg, f"r={r} k={k}")
    if not run.te:
        return Row("te-vs-local", f"{NO_TE}; local/local stand-in {'agrees' if ok else 'DISAGREES'} ({shape})",
                   figure, "skip" if ok else "FAIL")
    return Row("te-vs-local", f"te vs local, same weights, bf16, {shape}; tol logits {run.tol['logits']:g}, "
                              f"grads {run.tol['grads']:g}", figure, "ok" if ok else "FAIL")


def check_train_step(run: Run) -> Row:
    from recurdepth.peak import CPU_SIZES, GPU_SIZES, measure_matmul_peak

    trainer, metrics = train_steps(run, BENCH_CONFIG, run.overrides(run.mode.big))
    on_gpu = trainer.device.type == "cuda"  # the mm peak in the step's dtype (bf16 on GPU), measured in this run
    peak = measure_matmul_peak(GPU_SIZES if on_gpu else CPU_SIZES, repeats=3, dtype=trainer.dtype,
                               device="cuda" if on_gpu else "cpu")
    timed = metrics[run.mode.warmup:]
    flops = sum(m.flops for m in timed) / sum(m.seconds for m in timed)
    tokens_per_s = sum(m.tokens for m in timed) / sum(m.seconds for m in timed)
    params = sum(p.numel() for p in trainer.engine.module.parameters())
    run.eager, run.trainer = (tokens_per_s, metrics[0].loss), trainer
    losses = [m.loss for m in metrics]
    ok = all(math.isfinite(v) for v in losses)
    dtype = str(trainer.dtype).replace("torch.", "")
    size = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"
    return Row("train-step", f"{size} params, {_shape(trainer.cfg)}, {run.spec} {dtype}, {len(timed)} timed after "
                             f"{run.mode.warmup} warm-up; loss {losses[0]:.3f} -> {losses[-1]:.3f}",
               f"{tokens_per_s:,.0f} tok/s, MFU {flops / peak:.1%} of {peak / 1e12:,.2f} TFLOP/s "
               f"{dtype} mm", "ok" if ok else "FAIL")


def check_decode(run: Run) -> Row:
    from recurdepth.infer.decoder import DecodeOptions, LoopedDecoder
    from recurdepth.infer.generate import generate

    if run.trainer is None:
        return Row("decode", "needs the train-step check's model, which did not build", "", "skip")
    trainer, (batch, prompt_len, new) = run.trainer, run.mode.decode
    model, vocab, r = trainer.engine.module.eval(), trainer.data.tokenizer.vocab_size, trainer.cfg.recurrence.depth
    param = next(model.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (2, min(32, trainer.cfg.model.seq_length)), generator=g).to(param.device)
    ref = _logits(model, x, r)
    with torch.no_grad():
        dec = LoopedDecoder(model, x.shape[0], x.shape[1], DecodeOptions(depth=r, init="zeros"))
        half = x.shape[1] // 2
        cached = torch.cat([dec.step(x[:, :half])] + [dec.step(x[:, t:t + 1]) for t in range(half, x.shape[1])], 1)
    diff = relative_diff(cached, ref)
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(param.device)
    options = DecodeOptions(depth=r, init="zeros")
    generate(model, prompt, 2, options, eod=None, vocab_size=vocab)  # warm-up
    _sync()
    start = time.perf_counter()
    generate(model, prompt, new, options, eod=None, vocab_size=vocab)
    _sync()
    rate = new * batch / (time.perf_counter() - start)
    ok = diff <= run.tol["decode"]
    return Row("decode", f"KV cache vs forward at r={r}: prefill {half} + {x.shape[1] - half} single steps, "
                         f"tol {run.tol['decode']:g}; generate batch {batch}, prompt {prompt_len}, {new} new",
               f"{rate:,.1f} tok/s, logits {diff:.1e}", "ok" if ok else "FAIL")


def check_compile(run: Run) -> Row:
    if run.eager is None:
        return Row("compile", "needs the train-step check's eager figures", "", "skip")
    trainer, metrics = train_steps(run, BENCH_CONFIG, run.overrides(run.mode.big, compile=True))
    timed = metrics[run.mode.warmup:]
    rate = sum(m.tokens for m in timed) / sum(m.seconds for m in timed)
    eager_rate, eager_loss = run.eager
    loss_diff = abs(metrics[0].loss - eager_loss) / abs(eager_loss)
    ok = all(math.isfinite(m.loss) for m in metrics) and loss_diff <= run.tol["compile_loss"]
    return Row("compile", f"train.compile=true, same shape; first step {metrics[0].seconds:.1f} s (compiles); "
                          f"loss {metrics[0].loss:.4f} vs eager {eager_loss:.4f} (tol {run.tol['compile_loss']:g})",
               f"{rate:,.0f} tok/s = {rate / eager_rate:.2f}x eager", "ok" if ok else "FAIL")


def check_checkpoint(run: Run) -> Row:
    from recurdepth.infer.loading import load_model
    from recurdepth.model.names import to_local

    trainer, _ = train_steps(run, BENCH_CONFIG, run.overrides(run.mode.mid), steps=1)
    path = trainer.save()
    saved = trainer.engine.module.eval()
    param = next(saved.parameters())
    loaded = load_model(path, dtype=param.dtype, overrides={"spec": "local"}).model
    theirs, ours = to_local(saved.state_dict()), to_local(loaded.state_dict())  # names and tensors, no extra state
    equal = sum(1 for k in theirs if k in ours and torch.equal(theirs[k].cpu(), ours[k].cpu()))
    r = trainer.cfg.recurrence.depth
    x = torch.randint(0, trainer.data.tokenizer.vocab_size, (2, trainer.cfg.model.seq_length),
                      generator=torch.Generator().manual_seed(2)).to(param.device)
    diff = relative_diff(_logits(loaded, x, r), _logits(saved, x, r))
    ok = equal == len(theirs) == len(ours) and diff <= run.tol["logits"]
    figure = f"{equal}/{len(theirs)} tensors bit-equal, logits {diff:.1e}"
    if not run.te:
        return Row("ckpt-te-local", f"{NO_TE}; local save -> local load stand-in {'ok' if ok else 'BROKEN'}",
                   figure, "skip" if ok else "FAIL")
    return Row("ckpt-te-local", f"Trainer.save with model.spec=te -> load_model(spec=local), "
                                f"{str(param.dtype).replace('torch.', '')}, {_shape(trainer.cfg)}; tol logits "
                                f"{run.tol['logits']:g}", figure, "ok" if ok else "FAIL")


def check_quiet_star(run: Run) -> Row:
    trainer, metrics = train_steps(run, QUIET_STAR_CONFIG, run.overrides(run.mode.quiet_star), steps=2)
    o = trainer.cfg.objective
    losses = [m.loss for m in metrics]
    rate = metrics[-1].tokens / metrics[-1].seconds
    ok = all(math.isfinite(v) for v in losses)
    row = Row("quiet-star", f"objective.kind=quiet_star T={o.thought_length} n_ahead={o.n_ahead} passes={o.n_passes}, "
                            f"{_shape(trainer.cfg)}, {run.spec}; loss {losses[0]:.3f} -> {losses[-1]:.3f}",
              f"{rate:,.0f} tok/s (step 2)", "ok" if ok else "FAIL")
    return row


RUNNERS = {"te-vs-local": check_te_vs_local, "train-step": check_train_step, "decode": check_decode,
           "compile": check_compile, "ckpt-te-local": check_checkpoint, "quiet-star": check_quiet_star}


# ---------------------------------------------------------------- helpers


def _perturbed(model, seed: int = 0):
    """`model` with every weight moved off its init (norms by 0.3, matrices by 0.02), so that a swapped or
    dropped norm weight changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 0.02)).to(p.device, p.dtype))
    return model


@torch.no_grad()
def _logits(model, x: torch.Tensor, r: int) -> torch.Tensor:
    """Logits `[b, s, V]` of `x [b, s]` at depth r from s_0 = zeros (the decoder's `init="zeros"`)."""
    param = next(model.parameters())
    s0 = torch.zeros(x.shape[1], x.shape[0], model.config.hidden_size, dtype=param.dtype, device=param.device)
    return model(x, window=BackpropWindow(r, 0), s0=s0)


def train_steps(run: Run, config: str, overrides: list, steps: int | None = None):
    """A one-process bench trainer for `config` + `overrides`, and the metrics of its steps (warm-up included)."""
    steps = steps or run.mode.warmup + run.mode.steps
    trainer = bench_trainer(config, overrides, steps)
    metrics = [trainer.train_step() for _ in range(steps)]
    return trainer, metrics


def _shape(cfg, extra: str = "") -> str:
    m = cfg.model
    return (f"h={m.hidden_size} P{m.prelude_layers}+R{m.core_layers}xr+C{m.coda_layers} seq {m.seq_length}"
            + (f" {extra}" if extra else ""))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    """Release what the finished checks no longer reference (their trainers: a 1B model's memory on a GPU)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def format_table(rows: list) -> str:
    """The one table: check | result | figure | status, columns padded to their widest cell."""
    cells = [("check", "result", "figure", "status")] + [(r.check, r.result, r.figure, r.status) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = [" | ".join(c[i].ljust(widths[i]) for i in range(4)).rstrip() for c in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def run_checks(mode: Mode, budget: float, only: list | None = None) -> list:
    """Run the checks in order (each in this process, its output kept off stdout); a raising check is a FAIL row,
    its traceback on stderr. Checks that would start after `budget` seconds are skipped."""
    run, rows = Run(mode, budget), []
    for name in CHECKS:
        if only and name not in only:
            continue
        start = time.perf_counter()
        if start - run.start > budget:
            rows.append(Row(name, f"not started: the {budget:.0f} s budget was spent", "", "skip"))
            continue
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                row = RUNNERS[name](run)
        except Exception as exc:  # a failed check is a row; the others still run
            print(f"gpu-check: {name} raised:\n{log.getvalue()[-2000:]}{traceback.format_exc()}", file=sys.stderr)
            row = Row(name, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}", "", "FAIL")
        if name == "decode":  # the train-step trainer's last use
            run.trainer = None
        _free()
        row.seconds = time.perf_counter() - start
        print(f"gpu-check: {name}: {row.status} ({row.seconds:.1f} s)", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def run_gpu_check(args) -> int:
    from recurdepth.errors import ConfigError

    mode = QUICK if args.quick else FULL
    if not args.quick and not torch.cuda.is_available():
        raise ConfigError("no CUDA device: the full gpu-check trains a ~1B model in bf16 on one GPU; run it there, "
                          "or use --quick (tiny shapes, CPU)")
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA)"
    only = args.only.split(",") if args.only else None
    unknown = sorted(set(only or ()) - set(CHECKS))
    if unknown:
        raise ConfigError(f"--only {','.join(unknown)}: not a check; use some of {','.join(CHECKS)}")
    start = time.perf_counter()
    rows = run_checks(mode, args.budget if args.budget is not None else (math.inf if args.quick else 480), only)
    te = "transformer_engine " + ("yes" if te_available() else "no")
    print(f"gpu-check{' --quick' if args.quick else ''}: {where}, torch {torch.__version__}, {te}; "
          f"{time.perf_counter() - start:.0f} s ({', '.join(f'{r.check} {r.seconds:.0f} s' for r in rows)})")
    print(format_table(rows), flush=True)
    return 1 if any(r.status == "FAIL" for r in rows) else 0
