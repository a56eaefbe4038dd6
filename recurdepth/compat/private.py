"""megatron-core private names recurdepth uses, each behind the version gate: the one place they are imported.

They are not patches; they are megatron internals whose behaviour we rely on (listed in `compat.PATCHES` so the
table tests keep their targets alive): the parameter groups megatron's optimizer builds (DeepSpeed's AdamW gets
the same groups, so both engines make the same update), the .idx reader `IndexedDataset` opens (our indexed-format
checks read the format through megatron's own definition), and the per-split sample counts the blended builder
computes (split planning counts the samples megatron will ask for).
"""

from __future__ import annotations

from recurdepth.compat.version import check_megatron_version

__all__ = ["index_reader_class", "param_groups", "size_per_split_per_dataset"]


def param_groups(model_chunks, config):
    """megatron's optimizer parameter groups (weight-decay and lr-multiplier groups) of `model_chunks`."""
    check_megatron_version("recurdepth's use of megatron's optimizer parameter groups")
    from megatron.core.optimizer import _get_param_groups

    return _get_param_groups(model_chunks, config, None)


def index_reader_class():
    """megatron's `.idx` reader class (`indexed_dataset._IndexReader`)."""
    check_megatron_version("recurdepth's indexed-format checks")
    from megatron.core.datasets.indexed_dataset import _IndexReader

    return _IndexReader


def size_per_split_per_dataset(normalized_weights, target_size_per_split, surplus: float = 0.0):
    """The samples per split per dataset that megatron's blended builder requests."""
    check_megatron_version("recurdepth's split planning")
    from megatron.core.datasets.blended_megatron_dataset_builder import _get_size_per_split_per_dataset

    return _get_size_per_split_per_dataset(normalized_weights, target_size_per_split, surplus)
