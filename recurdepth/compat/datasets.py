"""A compact in-memory index for megatron-core's `IndexedDatasetBuilder` (used by `recurdepth data preprocess`).

  what megatron assumes                        what breaks without the fix -> the fix
  -------------------------------------------  -----------------------------------------------------------------
  `IndexedDatasetBuilder.__init__` keeps the   nothing fails, but memory grows with the corpus: a list of Python
  .idx it will write in Python lists:          ints costs ~36 bytes per entry (an 8-byte pointer plus a 28-byte
  `sequence_lengths` (one int per sequence,    int object), so a 100M-document corpus holds ~7 GB of index
  starting []) and `document_indices` (one     before `finalize` writes it, and large corpora run out of memory
  per document, starting [0]); `add_item`,     on an ordinary machine -> `compact_index_lists(builder)` swaps
  `add_document` and `end_document` only       the two fresh lists for `array("q")` typed arrays (8 bytes per
  `.append`/`.extend`/`len()` them, and        entry). They support every operation the builder and
  `finalize` -> `_IndexWriter.write` only      `_IndexWriter` use (`append`, `extend` with ints or numpy
  iterates them (`numpy.array(...)`,           integers, `len`, iteration, `numpy.array`), and the .idx written
  `len()`, `_sequence_pointers`' loop)          is byte-identical (tests/data/test_tokenizer_preprocess.py)

Only a builder in exactly the fresh state is touched (an empty `sequence_lengths` list, `document_indices ==
[0]`); one whose attributes look otherwise (another megatron version, or a builder already in use) is left as
it is, so the swap can cost memory but never correctness. Multimodal `sequence_modes` stay a list.

Versions tested: megatron-core 0.16.0 and 0.16.1 (`recurdepth.compat.version.TESTED_MEGATRON_VERSIONS`);
`compact_index_lists` calls `check_megatron_version` first, which refuses another version with one line
(RECURDEPTH_ALLOW_UNTESTED_MEGATRON=1: a warning, then the same guarded swap).
"""

from __future__ import annotations

from array import array

from recurdepth.compat.version import check_megatron_version

__all__ = ["compact_index_lists"]


def compact_index_lists(builder) -> bool:
    """Swap a fresh `IndexedDatasetBuilder`'s per-sequence and per-document index lists for typed arrays, before
    its first document; returns whether it did (False: the builder did not look fresh, nothing changed)."""
    check_megatron_version("recurdepth's compact IndexedDatasetBuilder index (recurdepth/compat/datasets.py)")
    lengths = getattr(builder, "sequence_lengths", None)
    documents = getattr(builder, "document_indices", None)
    if not (isinstance(lengths, list) and not lengths and isinstance(documents, list) and documents == [0]):
        return False
    builder.sequence_lengths = array("q")
    builder.document_indices = array("q", [0])
    return True
