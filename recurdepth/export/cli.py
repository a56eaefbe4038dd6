"""`recurdepth export CHECKPOINT --format hf-huginn OUT/` and `recurdepth import HF_DIR OUT/`.

Export writes a Hugging Face directory in Huginn-0125's format (see `hf_huginn`); import turns one back into a
recurdepth checkpoint folder (`OUT/step_00000000`, `OUT/latest`): model weights, a fresh optimizer state, the
config, reshardable to any TP/PP layout when loaded."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from recurdepth.atomic import fsync_dir, write_atomically
from recurdepth.errors import ConfigError
from recurdepth.model.names import local_name, to_local

FORMATS = ("hf-huginn", "hf-llama")  # export: looped models as Huginn, model.kind=dense as Llama
IMPORT_FORMATS = ("hf-huginn", "hf-llama")
_DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names; torch is imported when a command runs

if TYPE_CHECKING:
    import torch


def write_checkpoint(cfg, model, root: Path, vocab_size: int) -> Path:
    """Save `model` (with a fresh optimizer and scheduler) as step 0 under `root`, like a training checkpoint."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from recurdepth.train.checkpoint import TrainState, save_checkpoint
    from recurdepth.train.trainer import build_optimizer

    dtype = next(model.parameters()).dtype
    ddp = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.optimizer.distributed))
    optimizer, scheduler = build_optimizer(cfg, ddp, dtype)
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        _zero_adam_state(inner.optimizer)
    return save_checkpoint(Path(root), TrainState(), ddp, optimizer, scheduler, cfg.to_dict(), vocab_size=vocab_size)


def _zero_adam_state(adam: torch.optim.Optimizer) -> None:
    """Adam state as before the first step (zero moments, step 0): what a checkpoint needs to hold, with no step
    taken, so that the weights stay exactly as imported."""
    import torch

    for group in adam.param_groups:
        for p in group["params"]:
            state = adam.state[p]
            if not state:
                state.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p.data),
                             exp_avg_sq=torch.zeros_like(p.data))


def export_checkpoint(checkpoint: str, out_dir: str, fmt: str = "hf-huginn", dtype: str = "float32",
                      tokenizer=None, overwrite: bool = False, verify: bool = True) -> Path:
    """Export `checkpoint` to `out_dir` (refused, before anything is loaded, when `out_dir` is a file or a
    non-empty directory without `overwrite`; and when a checkpoint file fails its checksum, unless not `verify`)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    from recurdepth.export.hf_huginn import ExportError, check_export_target, check_exportable, export_huginn
    from recurdepth.export.hf_llama import export_llama, llama_incompatibilities
    from recurdepth.infer.loading import checkpoint_config, load_model, resolve_checkpoint

    check_export_target(Path(out_dir), overwrite)
    cfg = checkpoint_config(resolve_checkpoint(checkpoint))
    if fmt == "hf-llama":  # refuse before building anything
        bad = llama_incompatibilities(cfg)
        if bad:
            raise ExportError(f"the Llama format cannot represent {'; '.join(bad)}")
    else:
        check_exportable(cfg)
    loaded = load_model(checkpoint, tokenizer=tokenizer, verify=verify)
    import torch

    write = export_llama if fmt == "hf-llama" else export_huginn
    return write(loaded, Path(out_dir), getattr(torch, dtype), overwrite=overwrite)


def check_import_target(out: Path) -> None:
    """Refuse an import into a file, under one, or into a folder that already holds checkpoints (its `latest`
    would be repointed at the imported step 0, and the next `train` there would overwrite the run's own steps)
    or a tokenizer.model."""
    from recurdepth.export.hf_huginn import ExportError, check_output_path

    check_output_path(out, "import")
    if not out.is_dir():
        return
    for folder in (out, out / "checkpoints"):  # a checkpoints folder, or the run directory above one
        if not folder.is_dir():
            continue
        steps = sorted(p.name for p in folder.iterdir() if p.name.startswith("step_"))
        if steps or (folder / "latest").exists() or (folder / "latest").is_symlink():
            newest = f"newest {steps[-1]}" if steps else "a `latest` pointer"
            where = out if folder == out else f"{out} is a run directory: {folder}"
            raise ExportError(f"{where} already holds checkpoints ({newest}); import into an empty or new folder")
    for name in (TOKENIZER, HF_TOKENIZER_DIR, IMPORTED_CONFIG):
        if (out / name).exists():
            raise ExportError(f"{out} already holds a {name}; import into an empty or new folder")


TOKENIZER = "tokenizer.model"  # hf_huginn.TOKENIZER (that module imports torch; this one does not)
HF_TOKENIZER_DIR = "tokenizer"  # where an import puts a Hugging Face tokenizer's files, inside OUT
IMPORTED_CONFIG = "imported-config.yaml"  # the imported model's whole config, inside OUT


@dataclass
class Prepared:
    """What an import writes, all read and checked: the config, its tokenizer, the model weights (recurdepth
    names, full tensors), the tokenizer files to copy into OUT (name there -> source file) and a summary."""

    cfg: object
    tokenizer: object
    weights: dict
    tokenizer_files: dict
    summary: str


def find_tokenizer(hf_dir: Path, override: Optional[str] = None) -> tuple[Optional[str], Optional[Path]]:
    """(kind, path) of the tokenizer that goes with `hf_dir`'s weights: `override` (byte, a tokenizer.json, its
    folder or a sentencepiece .model; `tokenizer_kind`) else the directory's tokenizer.json (Hugging Face `tokenizers`), else its
    tokenizer.model (sentencepiece); (None, None) when it has neither."""
    if override:
        from recurdepth.data.tokenizer import tokenizer_kind

        kind = tokenizer_kind(override)
        return kind, None if kind == "byte" else Path(override)
    if (hf_dir / "tokenizer.json").is_file():
        return "hf", hf_dir
    if (hf_dir / TOKENIZER).is_file():
        return "sentencepiece", hf_dir / TOKENIZER
    return None, None


def _tokenizer_files(kind: Optional[str], path: Optional[Path]) -> dict:
    """The files to copy into OUT for the tokenizer (name inside OUT -> source)."""
    from recurdepth.data.tokenizer import hf_tokenizer_files, resolve_model_path

    if kind == "sentencepiece":
        return {TOKENIZER: resolve_model_path(path)}
    if kind == "hf":
        return {f"{HF_TOKENIZER_DIR}/{name}": f for name, f in hf_tokenizer_files(path).items()}
    return {}


def _prepare_huginn(hf_dir: Path, out: Path, tokenizer: Optional[str]) -> Prepared:
    from recurdepth.data.tokenizer import build_tokenizer
    from recurdepth.export.hf_huginn import ExportError, from_huginn_state, read_huginn, recurdepth_config_from_huginn

    config, hf_state = read_huginn(hf_dir)
    kind, tok_path = find_tokenizer(hf_dir, tokenizer)
    if kind is None and config.get("recurdepth_tokenizer", "sentencepiece") != "byte":
        raise ExportError(f"{hf_dir} has no tokenizer (tokenizer.json or {TOKENIZER}); put the tokenizer the weights "
                          f"were trained with next to them (recurdepth export writes it there) or pass --tokenizer")
    tok = build_tokenizer(kind, tok_path) if kind else None
    rows = hf_state["transformer.wte.weight"].shape[0]
    # the config names the tokenizer where it will be (inside OUT); it is read from where it is now
    where = None if kind in (None, "byte") else out / (TOKENIZER if kind == "sentencepiece" else HF_TOKENIZER_DIR)
    cfg = recurdepth_config_from_huginn(config, where, rows, kind or "sentencepiece", tok.vocab_size if tok else None)
    if tok is None:
        tok = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_model)
    return Prepared(cfg, tok, from_huginn_state(hf_state, cfg), _tokenizer_files(kind, tok_path),
                    f"huginn_raven: prelude {cfg.model.prelude_layers}, core {cfg.model.core_layers}, coda "
                    f"{cfg.model.coda_layers}")


def _prepare_llama(hf_dir: Path, out: Path, tokenizer: Optional[str], split_args: dict,
                   seq_length: Optional[int]) -> Prepared:
    from recurdepth.config import config_from_dict
    from recurdepth.data.tokenizer import build_tokenizer
    from recurdepth.export.hf_huginn import ExportError
    from recurdepth.export.hf_llama import describe, from_hf_state, model_rows, raw_config, read_llama

    config, hf_state, split = read_llama(hf_dir, seq_length=seq_length, **split_args)
    kind, tok_path = find_tokenizer(hf_dir, tokenizer)
    if kind is None:
        raise ExportError(f"{hf_dir} has no tokenizer.json or {TOKENIZER}; put the source model's tokenizer "
                          f"next to its weights or pass --tokenizer PATH (a tokenizer.json or its folder)")
    tok = build_tokenizer(kind, tok_path)
    rows = model_rows(hf_state, tok.vocab_size)
    raw = raw_config(config, rows, seq_length, split)
    raw["data"] = {"tokenizer": kind}
    if kind != "byte":
        where = out / (TOKENIZER if kind == "sentencepiece" else HF_TOKENIZER_DIR)
        raw["data"]["tokenizer_model"] = str(where.resolve())
    try:
        cfg = config_from_dict(raw)
    except ConfigError as exc:
        raise ExportError(f"the {config.get('model_type')} config cannot be expressed as a recurdepth config "
                          f"({exc})") from None
    return Prepared(cfg, tok, from_hf_state(hf_state, cfg, split), _tokenizer_files(kind, tok_path),
                    f"{config.get('model_type')}: {describe(split, int(config['num_hidden_layers']))}")


def import_checkpoint(hf_dir: str, out_dir: str, fmt: str = "hf-huginn", tokenizer: Optional[str] = None,
                      core: Optional[str] = None, prelude: Optional[str] = None, coda: Optional[str] = None,
                      drop: Optional[str] = None, seq_length: Optional[int] = None) -> Path:
    """A Hugging Face directory -> `out_dir/step_00000000` (+ `latest`, and the tokenizer's files).

    `fmt` hf-huginn: a huginn_raven directory (recurdepth's exports or Huginn's own); hf-llama: a Llama-family
    model split into prelude / core / coda by `core` (and `prelude`, `coda`, `drop`), see `hf_llama`.
    Everything is read and checked first, then built in a folder beside `out_dir` and moved into place at the
    end, under the run-directory lock of `out_dir`: a refused or failed import leaves `out_dir` as it was."""
    from recurdepth.export.hf_huginn import ExportError, Staging, check_imported_shapes, real_path
    from recurdepth.export.hf_llama import extend_rows
    from recurdepth.infer.loading import init_single_process
    from recurdepth.model.build import build_model
    from recurdepth.model.vocab import model_vocab_size
    from recurdepth.train.lock import run_dir_lock

    if fmt not in IMPORT_FORMATS:
        raise ConfigError(f"--format {fmt!r} is not an import format; use one of {', '.join(IMPORT_FORMATS)}")
    split_args = {"core": core, "prelude": prelude, "coda": coda, "drop": drop}
    if fmt == "hf-huginn":
        given = [f"--{k}" for k, v in {**split_args, "seq-length": seq_length}.items() if v is not None]
        if given:
            raise ExportError(f"{' '.join(given)} apply to --format hf-llama only: a Huginn model's prelude, core "
                              f"and coda are in its config.json")
    hf_dir, out = Path(hf_dir), real_path(Path(out_dir))
    check_import_target(out)
    prepared = (_prepare_huginn(hf_dir, out, tokenizer) if fmt == "hf-huginn"
                else _prepare_llama(hf_dir, out, tokenizer, split_args, seq_length))
    cfg, tok, weights = prepared.cfg, prepared.tokenizer, prepared.weights
    # the source's embedding (and head) rows, extended when the tokenizer gained special tokens past them
    rows, source_rows = model_vocab_size(cfg, tok.vocab_size), weights["embedding.word_embeddings.weight"].shape[0]
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in weights:
            weights[name] = extend_rows(weights[name], rows)
    if rows > source_rows:
        prepared.summary += f"; {rows - source_rows} embedding rows added for the tokenizer's new special tokens"
    init_single_process(cfg)
    dtype = weights["embedding.word_embeddings.weight"].dtype
    model = build_model(cfg, tok.vocab_size, dtype)
    check_imported_shapes(to_local(model.state_dict()), weights)
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():  # either spec's names (the TE spec where it is the default)
            param.copy_(weights[local_name(name)])
    made = [p for p in [out, *out.parents] if not p.exists()]  # taking the lock creates them
    try:
        with run_dir_lock(out, "import"):
            check_import_target(out)  # again, now that no train or import can start there
            staging = Staging(out, "import")
            tmp = staging.path
            try:
                for name, src in prepared.tokenizer_files.items():
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    write_atomically(tmp / name, Path(src).read_bytes())
                path = write_checkpoint(cfg, model, tmp, tok.vocab_size)
                # the model and tokenizer sections to train it with (a run resumes it only with the same model)
                write_atomically(tmp / IMPORTED_CONFIG, f"# written by recurdepth import ({prepared.summary}); train "
                                 f"it with this model section (docs/retrofit.md)\n" + cfg.to_yaml())
                names = [p.name for p in tmp.iterdir() if p.name != "latest"] + ["latest"]  # the pointer last
                moved = []
                try:
                    for name in names:
                        os.replace(tmp / name, out / name)
                        moved.append(name)
                    fsync_dir(out)  # the renames survive a crash
                except OSError:
                    for name in moved:  # nothing half-moved stays behind
                        target = out / name
                        if target.is_dir():
                            shutil.rmtree(target, ignore_errors=True)
                        else:
                            target.unlink(missing_ok=True)
                    raise
            except OSError as exc:
                raise ExportError(f"writing the import to {out} failed ({exc.strerror or exc}); nothing was "
                                  f"written there") from None
            finally:
                staging.discard(parents=False)
    except BaseException:
        for p in made:  # made by taking the lock; empty again once the lock is released
            try:
                p.rmdir()
            except OSError:
                break
        raise
    print(f"imported {prepared.summary}", flush=True)
    return out / path.name


def _export(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.out_dir, args.format, args.dtype, args.tokenizer,
                            overwrite=args.overwrite, verify=not args.no_verify)
    what = "transformers Llama" if args.format == "hf-llama" else "huginn_raven"
    print(f"wrote {out} ({what}: config.json, model.safetensors)", flush=True)
    return 0


def _import(args: argparse.Namespace) -> int:
    path = import_checkpoint(args.hf_dir, args.out_dir, args.format, args.tokenizer, core=args.core,
                             prelude=args.prelude, coda=args.coda, drop=args.drop, seq_length=args.seq_length)
    print(f"wrote {path}", flush=True)
    return 0


def add_export_parsers(verbs) -> None:
    e = verbs.add_parser("export", help="export a checkpoint: recurdepth export CKPT --format hf-huginn OUT_DIR")
    e.add_argument("checkpoint", help="a step_* checkpoint directory, its checkpoints folder or the run directory")
    e.add_argument("out_dir")
    e.add_argument("--format", default="hf-huginn", choices=FORMATS,
                   help="hf-huginn: Huginn-0125's Hugging Face format, for looped models (default); hf-llama: a "
                        "transformers LlamaForCausalLM (Qwen2 with a q/k/v bias, Qwen3 with q/k norms), for "
                        "model.kind=dense")
    e.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="dtype of the written weights")
    e.add_argument("--tokenizer", default=None,
                   help="tokenizer instead of the checkpoint's ('byte', a sentencepiece .model or a tokenizer.json)")
    e.add_argument("--overwrite", action="store_true",
                   help="export into a non-empty OUT_DIR, replacing the export's files there (other files are kept)")
    e.add_argument("--no-verify", action="store_true",
                   help="load the checkpoint without checking its files against the sha256 sums written at save")
    e.set_defaults(func=_export)
    i = verbs.add_parser("import", help="import a Hugging Face model: recurdepth import [--format F] HF_DIR OUT",
                         description="Import a Hugging Face model directory as a recurdepth checkpoint (step 0). "
                                     "hf-huginn: a huginn_raven model (Huginn-0125 or a recurdepth export). "
                                     "hf-llama: a Llama / Qwen2 / Mistral model retrofitted into a looped one, e.g. "
                                     "--prelude 0:4 --core 4:12 --coda 12:16 (docs/retrofit.md).")
    i.add_argument("hf_dir")
    i.add_argument("out_dir", help="checkpoint folder to write (step_00000000 and latest); new or empty, never "
                                   "one that holds checkpoints")
    i.add_argument("--format", default="hf-huginn", choices=IMPORT_FORMATS, help="the directory's format")
    i.add_argument("--tokenizer", default=None,
                   help="the tokenizer instead of HF_DIR's own: a tokenizer.json, its folder, a sentencepiece .model "
                        "or byte (recurdepth's byte tokenizer, e.g. for a model it exported from a byte-tokenizer run)")
    i.add_argument("--core", default=None, help="hf-llama: source layers to loop, START:STOP (half-open)")
    i.add_argument("--prelude", default=None,
                   help="hf-llama: source layers before the loop (default: all before --core)")
    i.add_argument("--coda", default=None, help="hf-llama: source layers after the loop (default: all after --core)")
    i.add_argument("--drop", default=None, help="hf-llama: source layers left out, START:STOP[,START:STOP...]")
    i.add_argument("--seq-length", type=int, default=None,
                   help="hf-llama: model.seq_length (default: the source's max_position_embeddings, at most 4096)")
    i.set_defaults(func=_import)
