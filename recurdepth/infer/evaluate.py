"""`recurdepth eval CHECKPOINT --depths 1,2,4,8,16,32`: how a looped model's quality depends on test-time depth.

At each depth r (or maximum depth, with `--exit-kl` or `--exit-gate`):
- validation loss and perplexity on the held-out split of the checkpoint's training blend (answer-only tokens
  for procedural sources, as in training), with the model's own forward;
- accuracy on held-out procedural tasks: greedy KV-cached generation after the prompt, scored by the task's
  verifier; by default every procedural source of the training blend at its training difficulty (test split,
  disjoint from the training samples) and at a harder difficulty (each `min_X..max_X` range moved past its
  training maximum), or the tasks given with `--task NAME[@key=value,...]`.

With `--depth-by-size` (a checkpoint of objective.kind=depth_by_size), each task set is also scored with every
problem at the r its size gives (`depth_offset + depth_scale x size`, as trained), and the validation loss with
each sequence at its own r: rows with depth 0 ("r=size"), their mean r in `mean_depth`.

Writes `eval.json`, `eval.csv`, `depth_sweep.png` (metric vs r, one line per task) and TensorBoard scalars
(`tensorboard/`, step = r) under `--out` (default `<run dir>/eval/<checkpoint name>`).
"""

from __future__ import annotations

import dataclasses

import csv
import json
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from recurdepth.errors import ConfigError, DataError
from recurdepth.infer.decoder import DecodeOptions
from recurdepth.infer.generate import generate


@dataclass
class TaskSet:
    """One line of the plot: held-out samples of a task at one difficulty."""

    task: str
    difficulty: dict
    label: str
    samples: list = field(default_factory=list, repr=False)


@dataclass
class Row:
    depth: int  # 0: each sample at the r of its size (--depth-by-size)
    metric: str  # valid_loss, valid_ppl, or accuracy
    task: str  # "" for validation metrics, else the TaskSet label
    value: float
    n: int
    mean_depth: float


def parse_depths(text: str) -> list[int]:
    """`"1,2,4"` -> [1, 2, 4]; anything else (or a depth <= 0) -> ConfigError."""
    try:
        depths = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--depths {text!r} is not a comma-separated list of integers, e.g. 1,2,4,8") from None
    if not depths or any(d <= 0 for d in depths):
        raise ConfigError(f"--depths {text!r}: every depth must be an integer >= 1, e.g. --depths 1,2,4,8")
    return sorted(set(depths))


def harder(difficulty: dict) -> dict:
    """Each `min_X..max_X` integer range moved just past its maximum: min = max + 1, max = max + max(1, max // 4)."""
    out = dict(difficulty)
    for key, value in difficulty.items():
        low = "min_" + key[4:]
        if key.startswith("max_") and low in difficulty and isinstance(value, int) and not isinstance(value, bool):
            out[low], out[key] = value + 1, value + max(1, value // 4)
    return out


def parse_task(spec: str) -> tuple[str, dict]:
    """`addition@min_digits=4,max_digits=5` -> ("addition", {"min_digits": 4, "max_digits": 5})."""
    import yaml

    name, _, rest = spec.partition("@")
    difficulty = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--task {spec!r}: write difficulty knobs as key=value, e.g. addition@min_digits=4")
        difficulty[key.strip()] = yaml.safe_load(value)
    return name.strip(), difficulty


def task_sets(cfg, specs: Optional[list[str]], n: int, seed: int) -> list[TaskSet]:
    """Held-out samples per task and difficulty (the test split excludes the training samples)."""
    from recurdepth.data.procedural import generate_split, get_task

    sources = []  # every procedural source training read: data.sources, then each of data.phases
    for blend in [cfg.data.sources] + [phase["sources"] for phase in cfg.data.phases]:
        sources += [s for s in blend if "procedural" in s and s["procedural"] not in {t["procedural"] for t in sources}]
    trained = {s["procedural"]: s for s in sources}
    wanted = []
    if specs:
        wanted = [parse_task(s) + ("",) for s in specs]
    else:
        for s in sources:
            task = get_task(s["procedural"])
            base = task.eval_difficulty(task.resolve(s.get("difficulty")))
            wanted += [(s["procedural"], base, "train difficulty"), (s["procedural"], harder(base), "harder")]
    if not wanted:
        raise DataError("the checkpoint was trained without procedural tasks; name some with --task NAME[@key=value]")
    out = []
    for name, difficulty, tag in wanted:
        src = trained.get(name, {})
        full = get_task(name).resolve(difficulty)
        try:
            samples = generate_split(name, n, "test", full, seed=int(src.get("seed", 0)),
                                     train_n=int(src.get("n", 10000)), train_difficulty=src.get("difficulty"))
        except DataError as exc:
            if specs:
                raise
            print(f"note: no {name} set at its {tag} ({exc})", flush=True)  # e.g. training saw almost every case
            continue
        knobs = ",".join(f"{k}={v}" for k, v in full.items() if k.startswith(("min_", "max_")))
        label = f"{name} {tag} ({knobs})" if tag else f"{name} ({knobs})"
        out.append(TaskSet(name, full, label, samples))
    return out


@torch.no_grad()
def task_accuracy(loaded, samples: list, options: DecodeOptions, batch_size: int = 64,
                  exit_depths: Optional[Counter] = None) -> tuple[float, float]:
    """(fraction of samples whose greedy answer the verifier accepts, mean iterations per generated token).
    Prompts are `<eod> prompt + " "` (a document starts after an eod in training), batched by token length;
    generation stops at eod or 4 tokens past the longest reference answer. `exit_depths`, if given, counts the
    generated tokens by the iterations each used."""
    from recurdepth.data.procedural import verify_sample

    tok = loaded.tokenizer
    max_new_tokens = max(len(tok.tokenize(s.answer)) for s in samples) + 4
    groups = defaultdict(list)
    for sample in samples:
        ids = [tok.eod] + tok.tokenize(sample.prompt + " ")
        groups[len(ids)].append((sample, ids))
    correct, depth_sum, depth_count = 0, 0.0, 0
    for _, items in sorted(groups.items()):
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            prompt = torch.tensor([ids for _, ids in chunk])
            result = generate(loaded.model, prompt, max_new_tokens, options, tok.eod, vocab_size=loaded.vocab_size)
            for (sample, _), row in zip(chunk, result.tokens.tolist()):
                answer = tok.detokenize(row[:row.index(tok.eod)] if tok.eod in row else row)
                correct += bool(verify_sample(sample, answer.strip()))
            counted = result.depths > 0
            if exit_depths is not None:
                exit_depths.update(result.depths[counted].tolist())
            depth_sum += float(result.depths[counted].sum())
            depth_count += int(counted.sum())
    return correct / max(len(samples), 1), depth_sum / max(depth_count, 1)


@torch.no_grad()
def task_accuracy_by_size(loaded, samples: list, options: DecodeOptions, rule) -> tuple[float, float]:
    """`task_accuracy` with every sample at r = rule(its size): (accuracy, mean r over the samples)."""
    from recurdepth.data.sized import sample_size

    groups = defaultdict(list)
    for sample in samples:
        groups[rule(sample_size(sample, "--depth-by-size"))].append(sample)
    correct = 0.0
    for r, group in sorted(groups.items()):
        acc, _ = task_accuracy(loaded, group, DecodeOptions(**{**asdict(options), "depth": r}))
        correct += acc * len(group)
    n = max(len(samples), 1)
    return correct / n, sum(r * len(g) for r, g in groups.items()) / n


@torch.no_grad()
def validation_loss(loaded, dataset, depth: int, samples: int, batch_size: int = 8,
                    routed: bool = False, rule=None) -> tuple[float, int]:
    """Token-mean loss (under the loss mask) over the first `samples` validation samples at depth r; `routed`: a
    recursion_router model routed as its decoder routes (`RouterObjective.causal_forward`); `rule`: each
    sequence at r = rule(its size) instead (per-sample depth)."""
    from recurdepth.model.depth import BackpropWindow

    if routed:
        from recurdepth.objectives import build_objective

        router = build_objective(loaded.cfg, loaded.tokenizer)

    total, tokens = 0.0, 0
    for start in range(0, min(samples, len(dataset)), batch_size):
        ids = list(range(start, min(start + batch_size, samples, len(dataset))))
        items = [dataset[i] for i in ids]
        x = torch.stack([s["tokens"] for s in items])
        labels = torch.stack([s["labels"] for s in items])
        mask = torch.stack([s["loss_mask"] for s in items]).float()
        if routed:
            per_token, _ = router.causal_forward(loaded.model, x, BackpropWindow(depth, 0), sample_ids=ids,
                                                 labels=labels)
        elif rule is not None:
            depths = [rule(s["size"]) for s in items]
            per_token = loaded.model(x, labels=labels, window=BackpropWindow(max(depths), 0), sample_ids=ids,
                                     row_depths=depths)
        else:
            per_token = loaded.model(x, labels=labels, window=BackpropWindow(depth, 0), sample_ids=ids)
        total += float((per_token.float() * mask).sum())
        tokens += int(mask.sum())
    return total / max(tokens, 1), tokens


def run_eval(loaded, depths: list[int], sets: list[TaskSet], options: DecodeOptions, valid_samples: int,
             exit_rows: Optional[list] = None, by_size=None) -> list[Row]:
    """The rows of every depth; `exit_rows`, if given, gets {depth, task, exit_depth, tokens} per exit depth used
    (the exit-depth histogram of each task set at each maximum depth); `by_size` (size -> r): the depth-0 rows,
    every sample at the r of its size."""
    rows = []
    valid = None
    if valid_samples > 0:
        from recurdepth.data.pipeline import build_datasets

        t = loaded.cfg.train
        valid = build_datasets(loaded.cfg, t.steps * t.global_batch_size, max(valid_samples, 1)).valid
    dense = loaded.cfg.model.kind == "dense"  # one pass per token: every r scores the same, so it is scored once
    if dense:
        print("model.kind=dense: one pass per token; each r below repeats the same scores (the baseline a looped "
              "model's r is compared with)", flush=True)
    for depth in depths:
        if dense and depth != depths[0]:
            rows += [dataclasses.replace(r, depth=depth) for r in rows if r.depth == depths[0]]
        else:
            if valid is not None:
                loss, n = validation_loss(loaded, valid, depth, valid_samples, routed=options.exit_router)
                rows += [Row(depth, "valid_loss", "", loss, n, depth),
                         Row(depth, "valid_ppl", "", math.exp(min(loss, 50.0)), n, depth)]
            opts = DecodeOptions(**{**asdict(options), "depth": depth})
            for ts in sets:
                used = Counter()
                acc, mean_depth = task_accuracy(loaded, ts.samples, opts, exit_depths=used)
                rows.append(Row(depth, "accuracy", ts.label, acc, len(ts.samples), mean_depth))
                if exit_rows is not None:
                    exit_rows += [{"depth": depth, "task": ts.label, "exit_depth": d, "tokens": n}
                                  for d, n in sorted(used.items())]
        line = " | ".join(f"{r.task or r.metric} {r.value:.4g}" for r in rows if r.depth == depth)
        print(f"r={depth:3d} | {line}", flush=True)
    if by_size is not None:
        if valid is not None:
            loss, n = validation_loss(loaded, valid, 0, valid_samples, rule=by_size)
            rows += [Row(0, "valid_loss", "", loss, n, 0.0), Row(0, "valid_ppl", "", math.exp(min(loss, 50.0)), n, 0.0)]
        for ts in sets:
            acc, mean_r = task_accuracy_by_size(loaded, ts.samples, options, by_size)
            rows.append(Row(0, "accuracy", ts.label, acc, len(ts.samples), mean_r))
        line = " | ".join(f"{r.task or r.metric} {r.value:.4g}" + (f" (mean r {r.mean_depth:.2f})" if r.task else "")
                          for r in rows if r.depth == 0)
        print(f"r=size | {line}", flush=True)
    return rows


def write_outputs(rows: list[Row], out: Path, title: str, meta: dict, exit_rows: Optional[list] = None) -> dict:
    """eval.json, eval.csv, depth_sweep.png, compute.csv / compute.png (accuracy vs mean iterations per generated
    token: the compute Pareto curve), exit_depths.csv (with an exit rule: tokens per exit depth, per task and
    maximum depth) and TensorBoard scalars under `out`; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows],
                                               "exit_depths": exit_rows or []}, indent=1) + "\n")
    with open(out / "eval.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(Row.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    written = {"json": out / "eval.json", "csv": out / "eval.csv"}
    accuracy = [r for r in rows if r.metric == "accuracy"]
    with open(out / "compute.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "max_depth", "mean_iterations", "accuracy", "n"])
        writer.writerows([r.task, r.depth, r.mean_depth, r.value, r.n] for r in accuracy)
    written["compute_csv"] = out / "compute.csv"
    if exit_rows:
        with open(out / "exit_depths.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["depth", "task", "exit_depth", "tokens"])
            writer.writeheader()
            writer.writerows(exit_rows)
        written["exit_csv"] = out / "exit_depths.csv"
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tensorboard")) as tb:
        for r in rows:
            name = f"eval/{r.metric}" + (f"/{r.task}" if r.task else "")
            tb.add_scalar(name, r.value, global_step=r.depth)
        for r in accuracy:  # the Pareto curve: accuracy against the iterations it cost (x100 for an integer step)
            tb.add_scalar(f"eval/accuracy_vs_iterations/{r.task}", r.value, global_step=round(100 * r.mean_depth))
        for e in exit_rows or []:
            tb.add_scalar(f"eval/exit_depth_tokens/{e['task']}/r{e['depth']}", e["tokens"], global_step=e["exit_depth"])
    written["tensorboard"] = out / "tensorboard"
    written["png"] = plot(rows, out / "depth_sweep.png", title)
    written["compute_png"] = plot_compute(accuracy, out / "compute.png", title)
    return written


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no plot was drawn (pip install matplotlib)", flush=True)
        return None
    return plt


def _accuracy_axes(ax, points_by_task: dict, xlabel: str, log2: bool) -> None:
    """One accuracy line per task set on `ax`."""
    for label, points in points_by_task.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=label)
    if log2:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (verifier)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(plt, fig, path: Path, title: str) -> Path:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_compute(accuracy: list[Row], path: Path, title: str) -> Optional[Path]:
    """Accuracy vs mean iterations per generated token, one line per task set (the compute Pareto curve)."""
    plt = _pyplot() if accuracy else None
    if plt is None:
        return None
    by_task = defaultdict(list)
    for r in accuracy:
        by_task[r.task].append((r.mean_depth, r.value))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    _accuracy_axes(ax, by_task, "mean core iterations per generated token", log2=False)
    return _save(plt, fig, path, title)


def plot(rows: list[Row], path: Path, title: str) -> Optional[Path]:
    """Accuracy vs r (one line per task set; log2 x axis) and validation loss vs r, side by side."""
    plt = _pyplot()
    if plt is None:
        return None
    acc = defaultdict(list)
    for r in rows:
        if r.metric == "accuracy" and r.depth > 0:  # depth 0 (r by size) has no place on the r axis
            acc[r.task].append((r.depth, r.value))
    loss = [(r.depth, r.value) for r in rows if r.metric == "valid_loss" and r.depth > 0]
    panels = 1 + bool(loss)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    _accuracy_axes(axes[0][0], acc, "test-time iterations r", log2=True)
    if loss:
        ax2 = axes[0][1]
        xs, ys = zip(*sorted(loss))
        ax2.plot(xs, ys, marker="o", color="black")
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("test-time iterations r")
        ax2.set_ylabel("validation loss (answer tokens)")
        ax2.grid(alpha=0.3)
    return _save(plt, fig, path, title)


def default_out_dir(checkpoint: Path) -> Path:
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "eval" / checkpoint.name
    return checkpoint.parent / f"{checkpoint.name}-eval"
