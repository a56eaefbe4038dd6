"""recurdepth: distributed training of recurrent-depth (looped-layer) language models on megatron-core."""

__version__ = "0.1.0"
