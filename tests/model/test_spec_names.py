"""The TransformerEngine spec's parameter names and the local spec's are one model (recurdepth.model.names):
checkpoints, export and import are the same whichever spec trained or reads them.

TransformerEngine cannot be installed without CUDA, so the TE side here is a *TE-shaped* spec: the local spec with
n1 fused into linear_qkv and n3 into linear_fc1 under TE's parameter names (`layer_norm_weight`) and a TE-style
`_extra_state` on the fused linears, as `TELayerNormColumnParallelLinear` has (tests/gpu runs the real one)."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F

from recurdepth.model.depth import BackpropWindow
from recurdepth.model.names import local_name, to_local, to_spec
from tests.export.huginn_reference import huginn_logits
from tests.export.test_hf_huginn import huginn_cfg

VOCAB = 264


@functools.lru_cache(maxsize=None)
def fused_norm_linear():
    """A column-parallel linear computing `RMSNorm(x) @ W^T`, the norm's weight held by the linear under TE's name."""
    from recurdepth.model.layers import LocalColumnParallelLinear

    class FusedNormColumnLinear(LocalColumnParallelLinear):
        def __init__(self, input_size, output_size, *, config, **kw):
            super().__init__(input_size, output_size, config=config, **kw)
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
            self.norm_eps = config.layernorm_epsilon
            self._load_state_dict_pre_hooks.clear()  # megatron's fills a missing _extra_state; TE's modules don't

        def forward(self, x, *args, **kw):
            x = F.rms_norm(x, (x.shape[-1],), self.layer_norm_weight, self.norm_eps)
            return super().forward(x, *args, **kw)

        def get_extra_state(self):  # TE keeps FP8 metadata here; recurdepth trains none
            return torch.tensor([0.0])

        def set_extra_state(self, state):
            pass

    return FusedNormColumnLinear


def te_shaped_spec(use_te, attention, num_experts=None, qk_norm=False):
    from megatron.core.transformer.identity_op import IdentityOp

    from recurdepth.model.layers import layer_spec_submodules

    sub, norm = layer_spec_submodules(False, attention, num_experts, qk_norm=qk_norm)
    sub = copy.deepcopy(sub)
    sub.self_attention.submodules.linear_qkv = fused_norm_linear()
    sub.mlp.submodules.linear_fc1 = fused_norm_linear()
    sub.input_layernorm = sub.pre_mlp_layernorm = IdentityOp
    return sub, norm


def perturbed(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # norms off 1 so that a swapped n1/n3 would show
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 if p.dim() == 1 else 0.02))
    return model


@pytest.fixture
def te_model(megatron_single_process, monkeypatch):
    from recurdepth.model.build import build_model

    monkeypatch.setattr("recurdepth.model.looped_gpt.layer_spec_submodules", te_shaped_spec)
    model = perturbed(build_model(huginn_cfg(), VOCAB))
    monkeypatch.undo()
    return model


def logits(model, x, r=4):
    with torch.no_grad():
        return model(x, window=BackpropWindow(r, 0))


def test_name_map_round_trip(te_model, megatron_single_process):
    from recurdepth.model.build import build_model

    te_state = te_model.state_dict()
    te_names = list(te_state)
    assert "core.0.self_attention.linear_qkv.layer_norm_weight" in te_names
    assert "core.0.mlp.linear_fc1.layer_norm_weight" in te_names
    assert any(k.endswith("_extra_state") for k in te_names)
    local_names = [k for k in build_model(huginn_cfg(), VOCAB).state_dict()
                   if not k.endswith("_extra_state")]  # megatron's own linears have an (empty) one too
    local = to_local(te_state)
    assert sorted(local) == sorted(local_names)  # every TE name has its local one; extra state dropped
    assert torch.equal(local["core.0.input_layernorm.weight"],
                       te_state["core.0.self_attention.linear_qkv.layer_norm_weight"])
    assert torch.equal(local["core.0.pre_mlp_layernorm.weight"], te_state["core.0.mlp.linear_fc1.layer_norm_weight"])
    back = to_spec(local, te_names)
    assert sorted(back) == sorted(k for k in te_names if not k.endswith("_extra_state"))
    for name, value in back.items():
        assert value is te_state[name], name
    assert to_local(local) == local and local_name("core.1.mlp.linear_fc1.weight") == "core.1.mlp.linear_fc1.weight"


def test_te_checkpoint_loads_on_local_and_exports_to_huginn(te_model, megatron_single_process, monkeypatch,
                                                            tmp_path):
    from safetensors.torch import load_file

    from recurdepth.export.cli import export_checkpoint, write_checkpoint
    from recurdepth.export.hf_huginn import export_huginn
    from recurdepth.infer.loading import load_model

    cfg = huginn_cfg()
    write_checkpoint(cfg, te_model, tmp_path / "ckpt", VOCAB)  # trained (saved) with the TE spec
    local = load_model(tmp_path / "ckpt", dtype=torch.float64).model  # the local spec: CPU's default
    assert not any("layer_norm_weight" in k for k in local.state_dict())
    monkeypatch.setattr("recurdepth.model.looped_gpt.layer_spec_submodules", te_shaped_spec)
    te_loaded = load_model(tmp_path / "ckpt", dtype=torch.float64)  # and resumed with it
    monkeypatch.undo()
    te = te_loaded.model
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    ours = logits(te, x)
    torch.testing.assert_close(logits(local, x), ours, rtol=0, atol=1e-10)

    hf = export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    config = json.loads((hf / "config.json").read_text())
    sd = {k: v.double() for k, v in load_file(str(hf / "model.safetensors")).items()}
    torch.testing.assert_close(huginn_logits(sd, config, x, 4), ours, rtol=0, atol=1e-9)
    direct = export_huginn(te_loaded, tmp_path / "hf-te", torch.float32)  # a TE-spec model exported (on a GPU)
    direct = load_file(str(direct / "model.safetensors"))
    assert sorted(direct) == sorted(sd) and all(torch.equal(direct[k].double(), sd[k]) for k in sd)


def test_local_checkpoint_and_huginn_import_load_into_a_te_model(megatron_single_process, monkeypatch, tmp_path):
    from recurdepth.export.cli import export_checkpoint, import_checkpoint, write_checkpoint
    from recurdepth.infer.loading import load_model
    from recurdepth.model.build import build_model

    cfg = huginn_cfg()
    write_checkpoint(cfg, perturbed(build_model(cfg, VOCAB), seed=3), tmp_path / "ckpt", VOCAB)
    hf = export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    want = logits(load_model(tmp_path / "ckpt", dtype=torch.float64).model, x)

    monkeypatch.setattr("recurdepth.model.looped_gpt.layer_spec_submodules", te_shaped_spec)
    te = load_model(tmp_path / "ckpt", dtype=torch.float64).model  # resume/eval path: a TE model, local checkpoint
    assert "core.0.self_attention.linear_qkv.layer_norm_weight" in te.state_dict()
    torch.testing.assert_close(logits(te, x), want, rtol=0, atol=1e-10)
    imported = import_checkpoint(str(hf), str(tmp_path / "imported"))  # import builds the TE-shaped model here
    monkeypatch.undo()
    back = load_model(imported, dtype=torch.float64).model
    torch.testing.assert_close(logits(back, x), want, rtol=0, atol=1e-10)
