"""recurdepth: distributed training of recurrent-depth (looped-layer) language models on megatron-core."""

__version__ = "0.1.0"

from recurdepth.compat.megatron_jit import install as _install_jit_hook  # noqa: E402 - torch-free

_install_jit_hook()  # megatron's torch.compile fusions off on CPU, before megatron is first imported
