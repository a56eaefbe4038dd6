"""Export to Huginn's Hugging Face format and import back: bit-identical weights; the exported weights, read by
an independent re-statement of Huginn's forward, give recurdepth's logits; non-Huginn options are refused."""

from __future__ import annotations

import json
import math

import pytest
import torch

from recurdepth.config import load_config
from recurdepth.export.hf_huginn import (ExportError, check_exportable, qkv_from_huginn, qkv_to_huginn,
                                         rope_pair_order)
from recurdepth.model.depth import BackpropWindow
from tests.export.huginn_reference import huginn_logits

H = 32
HUGINN = [f"model.hidden_size={H}", "model.num_heads=4", "model.seq_length=16", "model.prelude_layers=1",
          "model.core_layers=2", "model.coda_layers=1", f"model.embedding_scale={math.sqrt(H)}",
          "model.norm_before_coda=true", "model.initial_state=zeros", "model.rotary_base=50000"]


def huginn_cfg(*extra):
    return load_config(None, HUGINN + list(extra))


@pytest.fixture(scope="module")
def roundtrip(megatron_single_process, tmp_path_factory):
    """A Huginn-configured model with perturbed weights -> checkpoint -> export -> import."""
    from recurdepth.export.cli import export_checkpoint, import_checkpoint, write_checkpoint
    from recurdepth.model.build import build_model

    root = tmp_path_factory.mktemp("huginn")
    cfg = huginn_cfg()
    model = build_model(cfg, 264)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 0.02))
    write_checkpoint(cfg, model, root / "ckpt", 264)
    hf = export_checkpoint(str(root / "ckpt"), str(root / "hf"))
    imported = import_checkpoint(str(hf), str(root / "imported"))
    return root, hf, imported


def test_export_then_import_gives_bit_identical_weights(roundtrip):
    from recurdepth.infer.loading import load_model

    root, _, imported = roundtrip
    a = load_model(root / "ckpt").model.state_dict()
    b = load_model(imported).model.state_dict()
    names = [k for k, v in a.items() if torch.is_tensor(v)]
    assert names and names == [k for k, v in b.items() if torch.is_tensor(v)]
    for name in names:
        assert torch.equal(a[name], b[name]), name


def test_exported_directory_is_huginn_raven(roundtrip):
    from safetensors.torch import load_file

    _, hf, _ = roundtrip
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "huginn_raven" and config["architectures"] == ["RavenForCausalLM"]
    assert (config["n_embd"], config["n_layers_in_prelude"], config["n_layers_in_recurrent_block"],
            config["n_layers_in_coda"], config["tie_embeddings"], config["qk_bias"]) == (H, 1, 2, 1, True, False)
    names = set(load_file(str(hf / "model.safetensors")))
    block = {"norm_1", "norm_2", "norm_3", "norm_4", "attn.Wqkv", "attn.proj", "mlp.fc", "mlp.proj"}
    expected = {"transformer.wte.weight", "transformer.adapter.weight", "transformer.ln_f.weight", "freqs_cis"}
    for stack, count in (("prelude", 1), ("core_block", 2), ("coda", 1)):
        expected |= {f"transformer.{stack}.{i}.{p}.weight" for i in range(count) for p in block}
    assert names == expected  # lm_head is tied to wte, as in Huginn-0125


@pytest.mark.parametrize("r", [1, 4, 8])
def test_exported_weights_give_the_same_logits_under_huginns_equations(roundtrip, r):
    from safetensors.torch import load_file

    from recurdepth.infer.loading import load_model

    root, hf, _ = roundtrip
    config = json.loads((hf / "config.json").read_text())
    sd = {k: v.double() for k, v in load_file(str(hf / "model.safetensors")).items()}
    model = load_model(root / "ckpt", dtype=torch.float64).model
    x = torch.randint(0, 264, (2, 12), generator=torch.Generator().manual_seed(r))
    with torch.no_grad():
        ours = model(x, window=BackpropWindow(r, 0))
    theirs = huginn_logits(sd, config, x, r)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9)
    assert (huginn_logits(sd, config, x, r + 1) - ours).abs().max() > 1e-6  # the check can fail


def test_qkv_layout_and_rope_order():
    w = torch.randn(3 * 4 * 8, 32, dtype=torch.float64)
    assert torch.equal(qkv_from_huginn(qkv_to_huginn(w, 4), 4), w)
    assert rope_pair_order(6).tolist() == [0, 3, 1, 4, 2, 5]


def test_export_refuses_options_huginn_cannot_represent(megatron_single_process):
    check_exportable(huginn_cfg())
    for option, value in (("block_norm", "pre"), ("adapter", "gate"), ("num_query_groups", 2),
                          ("embedding_scale", 1.0), ("norm_before_coda", "false")):
        with pytest.raises(ExportError, match=f"model.{option}"):
            check_exportable(huginn_cfg(f"model.{option}={value}"))


def test_import_refuses_another_model_type(tmp_path):
    from recurdepth.export.hf_huginn import read_huginn

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ExportError, match="llama"):
        read_huginn(tmp_path)
