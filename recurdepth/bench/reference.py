"""Huginn's published modeling code as a reference in `recurdepth bench step --huginn DIR`.

DIR is a local checkout of seal-rg/recurrent-pretraining (its `recpre/raven_modeling_minimal.py` and
`raven_config_minimal.py`; they need `transformers`). Nothing of it is shipped here: the bench imports it from DIR,
builds `RavenForCausalLM` with the run's shapes (the same parameter count as our model: the bench prints both),
and times one step of it (its own truncated backprop with `num_steps=(r - k, k)`, its loss, `clip_grad_norm_`,
torch AdamW) on random tokens, interleaved with ours.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from recurdepth.errors import ConfigError


def huginn_baseline(trainer, checkout: str):
    """`(run(r, k) -> seconds, parameter count)` of Huginn's published model at `trainer`'s shapes."""
    root = Path(checkout).expanduser().resolve()
    if not (root / "recpre" / "raven_modeling_minimal.py").is_file():
        raise ConfigError(f"--huginn {checkout}: no recpre/raven_modeling_minimal.py there; pass a checkout of "
                          f"seal-rg/recurrent-pretraining")
    sys.path.insert(0, str(root))
    try:
        from recpre.raven_config_minimal import RavenConfig
        from recpre.raven_modeling_minimal import RavenForCausalLM
    except ImportError as exc:
        raise ConfigError(f"--huginn: cannot import Huginn's modeling code ({exc}); it needs `pip install "
                          f"'transformers<5'`") from None
    finally:
        sys.path.remove(str(root))
    from recurdepth.model.layers import default_ffn_hidden_size

    cfg, m, t = trainer.cfg, trainer.cfg.model, trainer.cfg.train
    model = trainer.engine.module
    config = RavenConfig(n_embd=m.hidden_size, n_heads=m.num_heads, n_layers=m.prelude_layers + m.core_layers +
                         m.coda_layers, block_size=m.seq_length, vocab_size=model.vocab_size,
                         padding_multiple=m.make_vocab_size_divisible_by,
                         intermediate_size=m.ffn_hidden_size or default_ffn_hidden_size(m.hidden_size, m.activation),
                         n_layers_in_recurrent_block=m.core_layers, n_layers_in_prelude=m.prelude_layers,
                         n_layers_in_coda=m.coda_layers, qk_bias=False, tie_embeddings=m.tie_embeddings,
                         rope_base=m.rotary_base, norm_eps=m.norm_eps, torch_dtype="float32")
    ref = RavenForCausalLM(config).to(trainer.device, trainer.dtype)
    for p in ref.parameters():
        if p.dim() > 1:
            torch.nn.init.trunc_normal_(p, std=model.state_std)
    o = cfg.optimizer
    opt = torch.optim.AdamW(ref.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, trainer.data.tokenizer.vocab_size, (t.global_batch_size, m.seq_length + 1), generator=g)
    x, y = tokens[:, :-1].contiguous().to(trainer.device), tokens[:, 1:].contiguous().to(trainer.device)

    def run(r: int, k: int) -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        steps = torch.tensor([max(r - k, 0), min(r, k)])
        for i in range(0, t.global_batch_size, t.micro_batch_size):
            out = ref(x[i:i + t.micro_batch_size], labels=y[i:i + t.micro_batch_size], num_steps=steps)
            out.loss.backward()
        if o.clip_grad:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), o.clip_grad)
        opt.step()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return run, sum(p.numel() for p in ref.parameters())
