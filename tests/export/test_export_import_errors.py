"""Bad input to `recurdepth export` and `recurdepth import`: one `error:` line, exit 2, no traceback, and the
output (and input) directories byte-identical before and after. Exports and imports are built beside their
destination and moved into place at the end, so a failure half-way leaves nothing half-made either."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from recurdepth.errors import RecurdepthError
from tests.conftest import assert_one_error, run_cli
from tests.export.test_hf_huginn import huginn_cfg
from tests.snapshot import assert_unchanged, tree_snapshot


def leftovers(folder: Path) -> list[str]:
    """Staging folders an export or import left beside its destination."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def made(megatron_single_process, tmp_path_factory):
    """A Huginn-configured checkpoint (byte tokenizer) and its export."""
    from recurdepth.export.cli import export_checkpoint, write_checkpoint
    from recurdepth.model.build import build_model

    root = tmp_path_factory.mktemp("export-errors")
    cfg = huginn_cfg()
    write_checkpoint(cfg, build_model(cfg, 264), root / "ckpt", 264)
    export_checkpoint(str(root / "ckpt"), str(root / "hf"))
    return root


def hf_copy(made: Path, dest: Path) -> Path:
    shutil.copytree(made / "hf", dest)
    return dest


# ------------------------------------------------------------------------------------------------ export


def test_export_to_a_regular_file_is_refused(made, tmp_path):
    """b03f592: FileExistsError traceback from mkdir."""
    target = tmp_path / "model.bin"
    target.write_text("a user's file\n")
    before = tree_snapshot(tmp_path)
    out = run_cli(["export", str(made / "ckpt"), "--format", "hf-huginn", str(target)], check=False, timeout=120)
    assert_one_error(out, f"{target} is an existing file, not a directory")
    assert_unchanged(before, tmp_path)


def test_export_into_a_non_empty_directory_needs_overwrite(made, tmp_path):
    """b03f592: the user's config.json was silently replaced. With --overwrite the export's files are replaced
    (a stale sharded index removed, so it cannot shadow the new weights) and the user's other files kept."""
    target = tmp_path / "repo"
    target.mkdir()
    (target / "config.json").write_text('{"mine": 1}\n')
    (target / "README.md").write_text("my model card\n")
    (target / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors"}}))
    (target / "shard-1.safetensors").write_bytes(b"old shard")
    before = tree_snapshot(tmp_path)
    out = run_cli(["export", str(made / "ckpt"), str(target)], check=False, timeout=120)
    assert_one_error(out, f"{target} is not empty", "--overwrite")
    assert_unchanged(before, tmp_path)

    out = run_cli(["export", str(made / "ckpt"), str(target), "--overwrite"], check=False, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (target / "README.md").read_text() == "my model card\n"
    assert json.loads((target / "config.json").read_text())["model_type"] == "huginn_raven"
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                        "model.safetensors"]
    assert (target / "model.safetensors").read_bytes() == (made / "hf" / "model.safetensors").read_bytes()
    assert leftovers(tmp_path) == []


def test_export_that_fails_half_way_leaves_nothing(made, tmp_path, monkeypatch):
    """A write error (disk full) while the weights are written: one line, no output directory, no staging
    folder, the parents it made removed again."""
    import errno

    import safetensors.torch

    from recurdepth.export.cli import export_checkpoint
    from recurdepth.export.hf_huginn import ExportError

    def disk_full(state, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    before = tree_snapshot(tmp_path)
    with pytest.raises(ExportError, match="No space left on device") as err:
        export_checkpoint(str(made / "ckpt"), str(tmp_path / "new" / "hf"))
    assert "\n" not in str(err.value)
    assert_unchanged(before, tmp_path)


# ------------------------------------------------------------------------------------------------ import


def test_import_of_a_truncated_safetensors_file_is_refused(made, tmp_path):
    """b03f592: SafetensorError traceback."""
    hf = hf_copy(made, tmp_path / "hf")
    weights = hf / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    before = tree_snapshot(tmp_path)
    out = run_cli(["import", str(hf), str(tmp_path / "imported")], check=False, timeout=120)
    assert_one_error(out, str(weights), "truncated or corrupt")
    assert_unchanged(before, tmp_path)


def test_a_refused_import_writes_nothing(made, tmp_path):
    """b03f592: the tokenizer was copied into OUT before the refusal, leaving a half-made checkpoint folder."""
    hf = hf_copy(made, tmp_path / "hf")
    (hf / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    before = tree_snapshot(tmp_path)
    out = run_cli(["import", str(hf), str(tmp_path / "run" / "checkpoints")], check=False, timeout=120)
    assert_one_error(out, "not a sentencepiece model")
    assert_unchanged(before, tmp_path)


def runs_checkpoints(made: Path, folder: Path, steps: list[int], latest: bool) -> Path:
    """A run's checkpoints folder holding `steps` (copies of one checkpoint) and maybe `latest`."""
    folder.mkdir(parents=True)
    for step in steps:
        shutil.copytree(made / "ckpt" / "step_00000000", folder / f"step_{step:08d}")
    if latest:
        (folder / "latest").write_text(f"step_{steps[-1]:08d}\n" if steps else "step_00000010\n")
    return folder


@pytest.mark.parametrize("steps,latest,into,needle", [
    ([10, 20, 30], True, "checkpoints",
     "checkpoints already holds checkpoints (newest step_00000030); import into an empty or new folder"),
    ([10], False, "checkpoints", "checkpoints already holds checkpoints (newest step_00000010)"),
    ([], True, "checkpoints", "checkpoints already holds checkpoints (a `latest` pointer)"),
    ([10], True, "run", "run is a run directory: "),  # the run directory above the checkpoints folder
])
def test_import_into_a_folder_that_holds_checkpoints_is_refused(made, tmp_path, steps, latest, into, needle):
    """b03f592: `latest` was repointed at the imported step 0, and the next `train` overwrote the run's step_10."""
    runs_checkpoints(made, tmp_path / "run" / "checkpoints", steps, latest)
    target = tmp_path / "run" / into if into == "checkpoints" else tmp_path / "run"
    before = tree_snapshot(tmp_path)
    if steps == [10, 20, 30]:  # the CLI's one line once; the other cases are refused by the same first check
        out = run_cli(["import", str(made / "hf"), str(target)], check=False, timeout=120)
        assert_one_error(out, f"{tmp_path / 'run'}", needle)
    else:
        from recurdepth.export.cli import import_checkpoint

        with pytest.raises(RecurdepthError, match=re.escape(needle)):
            import_checkpoint(str(made / "hf"), str(target))
    assert_unchanged(before, tmp_path)


def test_import_into_a_folder_locked_by_a_live_run_is_refused(made, tmp_path):
    """The run-dir lock (recurdepth.train.lock): a training that has not saved yet holds its checkpoints folder."""
    import socket

    import psutil

    from recurdepth.train.lock import LOCK_NAME

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    me = os.getpid()  # alive for as long as the test runs; the import runs in another process
    (folder / LOCK_NAME).write_text(json.dumps({
        "pid": me, "host": socket.gethostname(), "purpose": "train", "job": None, "restart": 0,
        "started": "2025-01-01T00:00:00+0000", "process_start": psutil.Process(me).create_time(), "command": "x"}))
    before = tree_snapshot(tmp_path)
    out = run_cli(["import", str(made / "hf"), str(folder)], check=False, timeout=120)
    assert_one_error(out, f"{folder} is in use by pid {me}", "(train,")
    assert_unchanged(before, tmp_path)


def test_import_into_an_empty_folder_moves_a_complete_checkpoint_into_place(made, tmp_path):
    from recurdepth.export.cli import import_checkpoint
    from recurdepth.infer.loading import load_model

    (tmp_path / "empty").mkdir()
    path = import_checkpoint(str(made / "hf"), str(tmp_path / "empty"))
    assert path == tmp_path / "empty" / "step_00000000"
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["imported-config.yaml", "latest", "step_00000000"]
    assert leftovers(tmp_path) == []
    a = load_model(made / "ckpt").model.state_dict()
    b = load_model(tmp_path / "empty").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


def _config(made, change):
    config = json.loads((made / "hf" / "config.json").read_text())
    return change(config)


def _foreign(config):
    """A Huginn config as Hugging Face publishes it (no recurdepth_config), lacking n_embd."""
    config.pop("recurdepth_config")
    config.pop("n_embd")
    return config


@pytest.mark.parametrize("damage,needle", [
    (lambda hf, made: (hf / "config.json").write_text("[1, 2]"), "holds a JSON list, not an object"),
    (lambda hf, made: (hf / "config.json").write_text(json.dumps(_config(made, _foreign))),
     "config.json has no 'n_embd'"),
    (lambda hf, made: (hf / "config.json").write_text(json.dumps(_config(made, lambda c: {
        **_foreign(c), "n_embd": "wide"}))), "config.json has a value of the wrong type"),
    (lambda hf, made: (hf / "model.safetensors.index.json").write_text("{not json"), "is not a safetensors index"),
    (lambda hf, made: __import__("safetensors.torch", fromlist=["x"]).save_file(
        {"transformer.ln_f.weight": torch.ones(4)}, str(hf / "model.safetensors")), "has no transformer.wte.weight"),
    (lambda hf, made: __import__("safetensors.torch", fromlist=["x"]).save_file(
        {**__import__("safetensors.torch", fromlist=["x"]).load_file(str(hf / "model.safetensors")),
         "transformer.core_block.0.attn.Wqkv.weight": torch.zeros(7, 32)}, str(hf / "model.safetensors")),
     "has shape (7, 32)"),
])
def test_damaged_huginn_directories_are_refused_in_one_line(made, tmp_path, damage, needle):
    """b03f592: AttributeError, KeyError, ValueError, JSONDecodeError, KeyError and RuntimeError tracebacks."""
    from recurdepth.export.cli import import_checkpoint

    hf = hf_copy(made, tmp_path / "hf")
    damage(hf, made)
    before = tree_snapshot(tmp_path)
    with pytest.raises(RecurdepthError) as err:
        import_checkpoint(str(hf), str(tmp_path / "imported"))
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert_unchanged(before, tmp_path)


def test_sentencepiece_import_names_the_tokenizer_where_it_ends_up(made, tmp_path):
    """The import is built in a staging folder, but the checkpoint's config must name OUT/tokenizer.model."""
    from recurdepth.data.builtin_corpus import stdlib_documents
    from recurdepth.data.tokenizer_train import train_tokenizer
    from recurdepth.export.cli import export_checkpoint, import_checkpoint, write_checkpoint
    from recurdepth.infer.loading import checkpoint_config, load_model, resolve_checkpoint
    from recurdepth.model.build import build_model

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(stdlib_documents(60_000)))
    train_tokenizer(text, tmp_path / "tok" / "spm", vocab_size=400, input_sentence_size=20_000, num_threads=1)
    cfg = huginn_cfg("data.tokenizer=sentencepiece", f"data.tokenizer_model={tmp_path}/tok/spm.model")
    write_checkpoint(cfg, build_model(cfg, 400), tmp_path / "ckpt", 400)
    export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "imported"))
    assert sorted(p.name for p in (tmp_path / "imported").iterdir()) == [
        "imported-config.yaml", "latest", "step_00000000", "tokenizer.model"]
    assert leftovers(tmp_path) == []
    saved = checkpoint_config(resolve_checkpoint(tmp_path / "imported"))
    assert Path(saved.data.tokenizer_model) == (tmp_path / "imported" / "tokenizer.model").resolve()
    assert load_model(tmp_path / "imported").tokenizer.vocab_size == 400
