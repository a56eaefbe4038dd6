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
    from recurdepth.export.cli import export_checkpoint, import_checkpoint
    from tests.export.perturbed import perturbed_checkpoint

    root = tmp_path_factory.mktemp("huginn")
    cfg = huginn_cfg()
    perturbed_checkpoint(cfg, root / "ckpt", 0.02)
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
                          ("embedding_scale", 1.0), ("norm_before_coda", "false"), ("qk_norm", "true"),
                          ("head_dim", 16), ("qkv_bias", "qkv"), ("rope_scaling", "linear")):
        with pytest.raises(ExportError, match=f"model.{option}"):
            check_exportable(huginn_cfg(f"model.{option}={value}"))


def test_import_refuses_another_model_type(tmp_path):
    from recurdepth.export.hf_huginn import read_huginn

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ExportError, match="llama"):
        read_huginn(tmp_path)


# ---------------------------------------------------------------------------------------------------- Huginn's own

def foreign_huginn_dir(folder, h=32, heads=4, rows=200, seed=0):
    """A huginn_raven directory as Huginn-0125 ships one (Huginn's key names and config keys, no recurdepth
    config, non-zero q/k bias, zero initial state, a tokenizers JSON with its tokenizer_config.json)."""
    from safetensors.torch import save_file

    from tests.export.test_hf_llama import write_tokenizer

    g = torch.Generator().manual_seed(seed)
    config = {"model_type": "huginn_raven", "architectures": ["RavenForCausalLM"], "n_embd": h, "n_heads": heads,
              "num_key_value_heads": heads, "n_layers_in_prelude": 1, "n_layers_in_recurrent_block": 2,
              "n_layers_in_coda": 1, "block_size": 32, "intermediate_size": 48, "vocab_size": rows,
              "padding_multiple": 8, "norm_eps": 1e-6, "rope_base": 50000.0, "qk_bias": True, "bias": False,
              "tie_embeddings": True, "state_init": "zero", "mean_recurrence": 4, "mean_backprop_depth": 2,
              "injection_type": "linear"}
    d = h // heads
    sd = {"transformer.wte.weight": torch.randn(rows, h, generator=g) * 0.5,
          "transformer.adapter.weight": torch.randn(h, 2 * h, generator=g) * 0.15,
          "transformer.ln_f.weight": 1 + 0.2 * torch.randn(h, generator=g)}
    for stack, n in (("prelude", 1), ("core_block", 2), ("coda", 1)):
        for i in range(n):
            p = f"transformer.{stack}.{i}."
            for j in range(1, 5):
                sd[p + f"norm_{j}.weight"] = 1 + 0.2 * torch.randn(h, generator=g)
            sd[p + "attn.Wqkv.weight"] = torch.randn(3 * h, h, generator=g) * 0.2
            sd[p + "attn.qk_bias"] = torch.randn(2, 1, heads, d, generator=g) * 0.5
            sd[p + "attn.proj.weight"] = torch.randn(h, h, generator=g) * 0.2
            sd[p + "mlp.fc.weight"] = torch.randn(96, h, generator=g) * 0.2
            sd[p + "mlp.proj.weight"] = torch.randn(h, 48, generator=g) * 0.2
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder)
    return config, sd


@pytest.fixture(scope="module")
def foreign(megatron_single_process, tmp_path_factory):
    from recurdepth.export.cli import import_checkpoint

    root = tmp_path_factory.mktemp("foreign")
    config, sd = foreign_huginn_dir(root / "huginn")
    return root, config, sd, import_checkpoint(str(root / "huginn"), str(root / "imported"))


@pytest.mark.parametrize("r", [1, 4])
def test_foreign_huginn_with_qk_bias_matches_the_float64_restatement(foreign, r):
    from recurdepth.infer.loading import load_model

    root, config, sd, imported = foreign
    loaded = load_model(imported, dtype=torch.float64)
    assert loaded.cfg.model.qkv_bias == "qk" and loaded.cfg.data.tokenizer == "hf"
    sd64 = {k: v.double() for k, v in sd.items()}
    x = torch.randint(0, 150, (2, 12), generator=torch.Generator().manual_seed(r))
    with torch.no_grad():
        ours = loaded.model(x, window=BackpropWindow(r, 0))[..., :200]
    torch.testing.assert_close(ours, huginn_logits(sd64, config, x, r), rtol=0, atol=1e-9)
    no_bias = {k: v for k, v in sd64.items() if not k.endswith("qk_bias")}
    assert (huginn_logits(no_bias, config, x, r) - ours).abs().max() > 1e-3  # the bias counts: the check can fail


def test_foreign_huginn_tokenizer_is_carried_and_exports_back(foreign):
    """The tokenizers JSON becomes the run's tokenizer (copied into the checkpoint folder, same ids); exporting
    the import writes Huginn's tensors back bit for bit, q/k bias included."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from recurdepth.export.cli import export_checkpoint, import_checkpoint
    from recurdepth.infer.loading import load_model

    root, config, sd, imported = foreign
    tok = load_model(imported).tokenizer
    raw = Tokenizer.from_file(str(root / "huginn" / "tokenizer.json"))
    text = "w1 w7 w42 w3"
    assert tok.tokenize(text) == raw.encode(text, add_special_tokens=False).ids
    assert tok.eod == raw.token_to_id("<|endoftext|>")  # aliased through tokenizer_config.json
    hf = export_checkpoint(str(imported), str(root / "exported"))
    back = load_file(str(hf / "model.safetensors"))
    for name, tensor in sd.items():
        assert torch.equal(back[name], tensor), name
    assert json.loads((hf / "config.json").read_text())["qk_bias"] is True
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the tokenizer goes with the weights, as it came
        assert (hf / name).read_bytes() == (root / "huginn" / name).read_bytes()
    again = import_checkpoint(str(hf), str(root / "reimported"))
    assert load_model(again).tokenizer.fingerprint() == tok.fingerprint()


def test_value_bias_is_refused_by_export():
    from recurdepth.export.hf_huginn import qk_bias_from_huginn, qk_bias_to_huginn

    qk = torch.randn(2, 1, 4, 8, dtype=torch.float64)
    fused = qk_bias_from_huginn(qk, 4)
    assert torch.equal(qk_bias_to_huginn(fused, 4), qk)
    fused.view(4, 3, 8)[1, 2, 0] = 1.0  # a value bias
    with pytest.raises(ExportError, match="value part"):
        qk_bias_to_huginn(fused, 4)


def test_bundled_huginn_config_matches_huginn_0125_and_exports():
    from pathlib import Path

    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "huginn-3.5b.yaml"))
    check_exportable(cfg)  # raises naming any option Huginn's format cannot hold
    m = cfg.model
    assert (m.hidden_size, m.num_heads, m.prelude_layers, m.core_layers, m.coda_layers, m.ffn_hidden_size,
            m.vocab_size, m.rotary_base, m.qkv_bias) == (5280, 55, 2, 4, 2, 17920, 65536, 50000, "qk")


def test_training_with_qk_bias_keeps_the_value_part_at_zero_and_exports(tmp_path, data_cache):
    """qkv_bias=qk trained through the real trainer (megatron DDP and optimizer): the q/k parts move, the value
    part stays exactly zero, so the checkpoint still exports to Huginn's format."""
    from safetensors.torch import load_file

    from tests.conftest import SMALL, TINY, run_cli

    run_dir = tmp_path / "run"
    huginn = ["model.embedding_scale=8.0", "model.norm_before_coda=true", "model.qkv_bias=qk"]
    run_cli(["train", str(TINY), *SMALL, *huginn, "train.steps=3", f"train.run_dir={run_dir}",
             f"data.cache_dir={data_cache}", "checkpoint.interval=3", "optimizer.lr=1e-2"])
    run_cli(["export", str(run_dir), str(tmp_path / "hf")])
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    biases = [v for k, v in sd.items() if k.endswith("attn.qk_bias")]
    assert len(biases) == 4 and all(b.abs().max() > 0 for b in biases)  # trained: q/k biases moved off zero
