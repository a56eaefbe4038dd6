"""`recurdepth VERB ...`: train, data (tokenizer, preprocess, check, procedural), plan, launch, bench, compare, sweep. Errors meant for people print one `error: ...` line and exit 2."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Optional, Sequence

from recurdepth.errors import RecurdepthError

USAGE_EXIT = 2


def _train(args: argparse.Namespace) -> int:
    from recurdepth.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.resume in ("never", "fresh"):
        cfg.checkpoint.resume = args.resume
    if args.no_verify:
        cfg.checkpoint.verify = False
    from recurdepth.train.trainer import Trainer

    trainer = Trainer(cfg)
    trainer.maybe_resume(args.resume if args.resume not in (None, "never", "fresh", "latest") else None)
    result = trainer.fit()
    if trainer.is_logger:
        where = f"; checkpoint {result.checkpoint}" if result.checkpoint else ""
        print(f"done: {result.final_step} steps in {cfg.train.run_dir}{where}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recurdepth", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    train = verbs.add_parser("train", help="train a looped model: recurdepth train CONFIG [section.key=value ...]")
    train.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20 model.hidden_size=128")
    train.add_argument("--resume", nargs="?", const="latest", default=None,
                       help="resume from the latest checkpoint (default when one exists), a given checkpoint "
                            "directory (newer ones are moved aside), 'never' to start afresh (refused where "
                            "checkpoints exist), or 'fresh' to move existing checkpoints aside and start afresh")
    train.add_argument("--no-verify", action="store_true",
                       help="load the checkpoint without checking its files against the sha256 sums written at save")
    train.set_defaults(func=_train)

    from recurdepth.bench import add_bench_parser
    from recurdepth.data.cli import add_data_parser
    from recurdepth.launch import add_launch_parser
    from recurdepth.plan import add_plan_parser

    add_data_parser(verbs)
    add_plan_parser(verbs)
    add_launch_parser(verbs)
    add_bench_parser(verbs)
    from recurdepth.export.cli import add_export_parsers
    from recurdepth.infer.cli import add_eval_parser, add_generate_parser

    add_eval_parser(verbs)
    add_generate_parser(verbs)
    add_export_parsers(verbs)
    from recurdepth.compare import add_compare_parser

    add_compare_parser(verbs)
    from recurdepth.sweep import add_sweep_parser

    add_sweep_parser(verbs)
    return parser


ERROR_GRACE_ENV = "RECURDEPTH_ERROR_GRACE_S"


def _let_rank0_say_it() -> None:
    """A rank other than 0 that met an error every rank meets stays alive until rank 0 has printed it: a launcher
    tears the job down at the first rank that exits, and a rank 1 quicker than rank 0 would take rank 0 (and
    the only error line) with it. Under `recurdepth.torchrun` it waits for rank 0's exit record; otherwise
    (plain torchrun, slurm, mpirun) for RECURDEPTH_ERROR_GRACE_S seconds (30), in which the launcher, having
    seen rank 0 exit, ends it."""
    import time

    from recurdepth.exits import EXIT_DIR_ENV

    if int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1) <= 1:
        return
    grace = float(os.environ.get(ERROR_GRACE_ENV, "30") or 0)
    folder = os.environ.get(EXIT_DIR_ENV)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if folder and os.path.exists(os.path.join(folder, "rank_0.json")):
            return
        time.sleep(0.1)


def main(argv: Optional[Sequence[str]] = None) -> None:
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", message=r".*Transformer Engine.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from recurdepth.exits import ExitRecord, launcher_rank

    record = ExitRecord.start()  # under RECURDEPTH_EXIT_DIR: how this process ended, for its launcher
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a usage error (2) or --help (0)
        record.write(exc.code)
        raise
    record.prepare(args)
    code = 1  # what Python exits with after an exception nobody catches
    try:
        code = args.func(args)
    except RecurdepthError as exc:
        if os.environ.get("RECURDEPTH_DEBUG"):  # the full traceback, chained causes included
            raise
        code = USAGE_EXIT
        if launcher_rank() == 0 or not exc.same_on_every_rank:  # the same error on every rank: say it once
            print(f"error: {exc}", file=sys.stderr, flush=True)
        else:
            record.write(code)
            _let_rank0_say_it()
    except KeyboardInterrupt:
        code = 130
    finally:
        if "torch.distributed" in sys.modules:  # a command that never imported torch has nothing to shut down
            from recurdepth.distributed import shutdown_distributed

            try:
                shutdown_distributed()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
        record.write(code)
    sys.exit(code)


def run() -> None:
    """The program's entry (`recurdepth`, `python -m recurdepth`): `main`, then a quick exit. Tearing down the
    interpreter after torch, megatron and inductor were imported takes ~2 s (module and object teardown that a
    process about to end does not need; measured 8.1 s -> 5.9 s for a 3-step CLI run), paid again by every rank
    of every launch. So once `main` is done: the atexit handlers run (multiprocessing's joins, logging's flush,
    megatron's), stdout and stderr are flushed, and the process ends with `os._exit(code)`. Skipped (a plain
    exit) when torch was never imported, when another non-daemon thread is alive (the normal exit joins it) or
    with RECURDEPTH_PLAIN_EXIT=1. `main` itself stays an ordinary function, for callers in the same process."""
    try:
        main()
    except SystemExit as exc:
        code = exc.code
        import threading

        others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
        if "torch" not in sys.modules or others or os.environ.get("RECURDEPTH_PLAIN_EXIT"):
            raise
        import atexit

        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed pipe: nothing left to say
                pass
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr, flush=True)
            code = 1
        os._exit(code)

