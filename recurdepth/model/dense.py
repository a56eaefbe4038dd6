"""`model.kind=dense`: megatron-core's own `GPTModel` trained by the same trainer, data, tokenizer, objective,
optimizer and engines as the looped model, so that a sweep's dense baseline differs from its looped candidate
in the architecture only (`recurdepth compare`, docs/compare.md).

It is built as `recurdepth bench dense` builds it: the looped blocks' layer spec (local: SDPA, RoPE, RMSNorm,
SwiGLU; TE on GPU) in megatron's pre-norm `TransformerLayer`, the same hidden size, heads, vocabulary, tying and
initialisation (every weight drawn from its name and the seed; output projections scaled by sqrt(2 L)), and
`dense_layers(cfg)` layers: `model.num_layers`, or P + round(mean r) R + C, the depth a token passes through
in the looped model. Checkpoints hold the GPTModel's own keys (`gpt.` + megatron's names), so megatron's readers
load them. What only the looped model has (the recurrence, pipeline stages of the looped schedule, thought-token
objectives, experts, iteration checkpointing) is refused by `Config.validate`, not ignored; r is not drawn.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule

from recurdepth.config import Config
from recurdepth.model.depth import dense_layers
from recurdepth.model.rope import rope_inv_freq


class DenseGPTModel(MegatronModule):
    """A megatron `GPTModel` behind the looped model's call: `model(tokens, labels=..., window=...)` -> the per-token
    loss `[b, s]` (or logits without labels). `window`, `sample_ids` and `collect_health` are accepted and unused:
    there is no recurrence to window and no per-iteration health."""

    kind = "dense"  # what the decoders dispatch on (recurdepth.infer.decoder.decoder_for)

    def __init__(self, gpt, vocab_size: int, num_layers: int):
        super().__init__(config=gpt.config)
        self.gpt, self.vocab_size, self.num_layers = gpt, vocab_size, num_layers
        self.pre_process = self.post_process = True
        self.last_health: dict = {}

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, window=None,
                sample_ids=None, collect_health: bool = False, *, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, **unused):
        if unused:
            raise TypeError(f"model.kind=dense takes no {', '.join(sorted(unused))} (a looped model's input)")
        if position_ids is None:  # [s], shared by the batch, as the looped model takes it
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.gpt(input_ids, position_ids.view(1, -1).expand_as(input_ids), attention_mask, labels=labels)

    def set_input_tensor(self, tensor) -> None:
        self.gpt.set_input_tensor(tensor)


def build_dense_model(cfg: Config, vocab_size: int, params_dtype: torch.dtype, device, tconfig,
                      use_te: bool) -> DenseGPTModel:
    """The dense GPT for `cfg` on `device` (parallel_state initialised), initialised like the looped model."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from recurdepth.model.layers import layer_spec_submodules
    from recurdepth.model.vocab import model_vocab_size

    layers = dense_layers(cfg)
    spec = ModuleSpec(module=TransformerLayer, submodules=layer_spec_submodules(use_te, cfg.model.attention,
                                                                                qk_norm=cfg.model.qk_norm)[0])
    gpt = GPTModel(dataclasses.replace(tconfig, num_layers=layers), spec,
                   vocab_size=model_vocab_size(cfg, vocab_size), max_sequence_length=cfg.model.seq_length,
                   share_embeddings_and_output_weights=cfg.model.tie_embeddings, position_embedding_type="rope",
                   rotary_base=int(cfg.model.rotary_base))
    if cfg.model.rope_scaling != "none":  # megatron's own table, with the scaled frequencies the looped model uses
        gpt.rotary_pos_emb.inv_freq = rope_inv_freq(cfg.model, tconfig.kv_channels).to(gpt.rotary_pos_emb.inv_freq)
    model = DenseGPTModel(gpt, model_vocab_size(cfg, vocab_size), layers)
    return model.to(device=device, dtype=params_dtype)
