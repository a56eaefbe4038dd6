"""The indexed-format checks (recurdepth/data/indexed.py) read the .idx with megatron-core's own reader and turn
what it refuses into the same one-line DataErrors as before; the builder's compact index (compat/datasets.py)
writes byte-identical files; the split modules keep the old import paths; prepared data is written durably."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from recurdepth.data import indexed, preprocess as preprocess_module, readers
from recurdepth.data.indexed import check_indexed_dataset, sequence_lengths, token_id_range
from recurdepth.data.preprocess import preprocess
from recurdepth.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
REBUILD = "rebuild it with `recurdepth data preprocess`"


@pytest.fixture
def dataset(tmp_path) -> Path:
    text = tmp_path / "t.txt"
    text.write_text("".join(f"document number {i} of a small corpus\n\n" for i in range(30)))
    prefix = tmp_path / "ds"
    preprocess(text, prefix, "byte", workers=1, progress=False)
    return prefix


@pytest.fixture
def reader_calls(monkeypatch) -> list:
    """Every .idx path megatron's `_IndexReader` is opened on."""
    from megatron.core.datasets import indexed_dataset

    calls, original = [], indexed_dataset._IndexReader.__init__

    def spy(self, idx_path, *args, **kwargs):
        calls.append(idx_path)
        return original(self, idx_path, *args, **kwargs)

    monkeypatch.setattr(indexed_dataset._IndexReader, "__init__", spy)
    return calls


def _header(prefix: Path) -> tuple:
    head = Path(str(prefix) + ".idx").read_bytes()[:34]
    return struct.unpack("<QBQQ", head[9:])  # version, dtype code, sequences, documents


def _set_byte(path: Path, offset: int, value: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + len(value)] = value
    path.write_bytes(bytes(data))


def _expected_lines(prefix: Path) -> dict:
    """The exact lines of the hand-parsing checker these checks replaced (b03f592's preprocess.py)."""
    idx = str(prefix) + ".idx"
    _, _, n_seq, n_doc = _header(prefix)
    size = Path(idx).stat().st_size
    return {
        "short": f"index {idx!r} is truncated (20 bytes, shorter than its 34-byte header); {REBUILD}",
        "magic": f"{idx!r} is not a megatron-core index (bad magic bytes); {REBUILD}",
        "arrays": (f"index {idx!r} is {size - 8} bytes but its header describes {n_seq} sequences and {n_doc} "
                   f"document boundaries ({size} bytes): it is truncated or corrupt; {REBUILD}"),
        "longer": (f"index {idx!r} is {size + 3} bytes but its header describes {n_seq} sequences and {n_doc} "
                   f"document boundaries ({size} bytes): it is truncated or corrupt; {REBUILD}"),
    }


@pytest.mark.parametrize("damage", ["short", "magic", "arrays", "longer"])
def test_a_corrupt_idx_gives_the_same_line_through_megatrons_reader(dataset, reader_calls, damage):
    idx = Path(str(dataset) + ".idx")
    expected = _expected_lines(dataset)[damage]
    data = idx.read_bytes()
    idx.write_bytes({"short": data[:20], "magic": b"NOTANIDX" * 8, "arrays": data[:-8],
                     "longer": data + b"\0\0\0"}[damage])
    with pytest.raises(DataError) as err:
        check_indexed_dataset(dataset)
    assert str(err.value) == expected
    assert reader_calls == [str(idx)]  # megatron's reader decided it, not a copy of the format


@pytest.mark.parametrize("field,offset,value,needle", [
    ("version", 9, struct.pack("<Q", 2), "bad version"),
    ("dtype code", 17, bytes([9]), "9 is not a valid DType"),
])
def test_unknown_version_or_dtype_code_is_one_line_naming_megatrons_reason(dataset, reader_calls, field, offset,
                                                                          value, needle):
    idx = Path(str(dataset) + ".idx")
    _set_byte(idx, offset, value)
    with pytest.raises(DataError) as err:
        check_indexed_dataset(dataset)
    msg = str(err.value)
    assert msg.startswith(f"index {str(idx)!r} has an unknown version or dtype code (megatron-core: {needle}")
    assert msg.endswith(f"); {REBUILD}") and "\n" not in msg and msg.count(str(idx)) == 1
    assert reader_calls == [str(idx)]


def test_boundaries_and_offsets_megatrons_reader_does_not_check(dataset):
    idx = Path(str(dataset) + ".idx")
    _, _, n_seq, n_doc = _header(dataset)
    good = idx.read_bytes()
    _set_byte(idx, 34 + 12 * n_seq + 8 * (n_doc - 1), struct.pack("<q", n_seq - 1))  # last document boundary
    with pytest.raises(DataError, match=rf"document boundaries 0\.\.{n_seq - 1} for {n_seq} sequences: it is corrupt"):
        check_indexed_dataset(dataset)
    idx.write_bytes(good)
    _set_byte(idx, 34 + 4 * n_seq, struct.pack("<q", 5))  # the first sequence's offset
    with pytest.raises(DataError, match="sequence offsets that disagree with its lengths"):
        check_indexed_dataset(dataset)
    idx.write_bytes(good)
    _set_byte(idx, 34, struct.pack("<i", -1))
    with pytest.raises(DataError, match="negative sequence lengths"):
        check_indexed_dataset(dataset)


def test_lengths_and_id_range_outlive_megatrons_memory_map(dataset):
    import gc

    lengths = sequence_lengths(dataset)
    gc.collect()  # the reader (and its memory map) is gone: the lengths are a copy
    assert len(lengths) == 30 and lengths.dtype == np.int32
    assert int(lengths.sum()) == Path(str(dataset) + ".bin").stat().st_size // 2  # uint16 tokens
    low, top = token_id_range(dataset)
    assert 0 <= low <= top < 264


def test_the_compact_builder_index_writes_the_same_bytes(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from recurdepth.compat.datasets import compact_index_lists

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 500, int(n)).astype(np.uint16) for n in rng.integers(1, 50, 40)]
    outputs = []
    for compact in (False, True):
        prefix = tmp_path / f"c{int(compact)}"
        builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
        if compact:
            assert compact_index_lists(builder) is True
            assert compact_index_lists(builder) is False  # no longer a fresh builder's lists: left alone
        for d in docs:
            builder.add_document(d, [len(d)])
        builder.finalize(str(prefix) + ".idx")
        outputs.append([Path(str(prefix) + ext).read_bytes() for ext in (".bin", ".idx")])
        check_indexed_dataset(prefix)
    assert outputs[0] == outputs[1]


def test_the_old_import_paths_still_work():
    for name in ("ReadStats", "resolve_inputs", "iter_records", "parse_jsonl_line", "iter_documents",
                 "empty_corpus_error", "TEXT_DOCS", "JSONL_SUFFIXES", "FOLDER_SUFFIXES"):
        assert getattr(preprocess_module, name) is getattr(readers, name)
    for name in ("check_indexed_dataset", "sequence_lengths", "token_id_range", "check_token_ids",
                 "read_manifest", "check_tokenizer_matches", "iter_indexed_documents"):
        assert getattr(preprocess_module, name) is getattr(indexed, name)
    assert set(preprocess_module.__all__) <= set(vars(preprocess_module))


def test_no_hand_parsing_of_the_idx_header_is_left():
    for module in (indexed, preprocess_module, readers):
        source = Path(module.__file__).read_text()
        assert "struct.unpack" not in source and "MMIDIDX" not in source, module.__name__


def test_prepared_files_are_written_atomically(tmp_path, monkeypatch):
    """Manifests and split files go through recurdepth.atomic.write_atomically (tmp, fsync, rename, fsync dir)."""
    import recurdepth.atomic as atomic
    from recurdepth.data.procedural import generate_split, read_jsonl, write_jsonl

    written = []
    original = atomic.write_atomically

    def spy(path, data, mode=None):
        written.append(Path(path).name)
        return original(path, data, mode)

    for module in ("recurdepth.data.preprocess", "recurdepth.data.procedural.splits"):
        monkeypatch.setattr(f"{module}.write_atomically", spy)
    samples = generate_split("sort", 5, "train")
    write_jsonl(samples, tmp_path / "split" / "sort.jsonl")
    assert read_jsonl(tmp_path / "split" / "sort.jsonl") == samples
    text = tmp_path / "t.txt"
    text.write_text("one\n\ntwo\n")
    manifest = preprocess(text, tmp_path / "out" / "ds", "byte", workers=1, progress=False)
    assert written == ["sort.jsonl", "ds.json"]
    assert json.loads((tmp_path / "out" / "ds.json").read_text())["documents"] == manifest["documents"] == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ds.bin", "ds.idx", "ds.json"]
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["sort.jsonl"]


def test_the_data_folder_keeps_its_readme_and_ignores_what_is_generated():
    from recurdepth.config import DataConfig

    assert DataConfig().cache_dir == "data/prepared"  # relative: under the working directory, as before
    assert (ROOT / "data" / "README.md").is_file()
    paths = ["data/README.md", "data/.gitignore", "data/prepared/stdlib-docs-abc/corpus.bin", "data/tok/spm.model",
             "data/corpus/mytext.idx", "data/procedural/sort-test.jsonl"]
    out = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    if out.returncode not in (0, 1):
        pytest.skip(f"git check-ignore unavailable: {out.stderr.strip()}")
    assert out.stdout.split() == paths[2:]
