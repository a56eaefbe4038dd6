"""`model.kind=dense`: megatron-core's GPTModel through the same trainer (the baseline of `recurdepth compare`).
Its checkpoint is megatron's: a bare GPTModel built here and loaded with megatron's own dist_checkpointing reader
gives the logits recurdepth's loader gives; a resumed run repeats the uninterrupted one bit for bit; the trainer
counts its FLOPs as a dense GPT's whatever the recurrence section says; what only a looped model has is refused."""

from __future__ import annotations

import pytest
import torch

from recurdepth.config import load_config
from recurdepth.errors import ConfigError
from tests.conftest import SMALL, TINY, read_metrics, run_cli

DENSE = [*SMALL, "model.kind=dense", "checkpoint.interval=3", "train.eval_interval=0"]
STEPS = 6


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("dense-straight")
    out = run_cli(["train", str(TINY), *DENSE, f"train.steps={STEPS}", f"train.run_dir={run_dir}",
                   f"data.cache_dir={data_cache}", f"optimizer.decay_steps={STEPS}"])
    assert "dense megatron GPTModel, 10 layers" in out.stdout  # P1 + round(mean r = 4) x R2 + C1
    return run_dir


def test_a_resumed_dense_run_repeats_the_uninterrupted_one(straight, tmp_path, data_cache):
    run_dir = tmp_path / "resumed"
    common = ["train", str(TINY), *DENSE, f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}",
              f"optimizer.decay_steps={STEPS}"]
    run_cli([*common, "train.steps=3"])
    out = run_cli([*common, f"train.steps={STEPS}"])
    assert "resumed from" in out.stdout
    a, b = read_metrics(straight), read_metrics(run_dir)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1)) and {r["depth"] for r in a} == {1}
    assert [r["loss"] for r in b] == [r["loss"] for r in a]


def test_megatrons_own_reader_loads_the_checkpoint_into_a_bare_gpt_model(straight, megatron_single_process):
    from megatron.core import dist_checkpointing

    from recurdepth.infer.loading import load_model
    from tests.train.test_flop_counter import dense_gpt

    ckpt = sorted((straight / "checkpoints").glob("step_*"))[-1]
    ours = load_model(ckpt)
    cfg = ours.cfg
    bare = dense_gpt(cfg, 10)
    torch.nn.init.zeros_(bare.embedding.word_embeddings.weight)  # nothing kept from its own initialisation
    loaded = dist_checkpointing.load({"model": bare.sharded_state_dict(prefix="gpt.")}, str(ckpt))["model"]
    missing, unexpected = bare.load_state_dict({k.removeprefix("gpt."): v for k, v in loaded.items()}, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    tokens = torch.randint(0, 256, (2, cfg.model.seq_length), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(cfg.model.seq_length).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        theirs = bare(tokens, positions, None)
        mine = ours.model(tokens)
    assert theirs.abs().max() > 0 and torch.equal(theirs, mine)


def test_dense_flops_are_a_dense_gpts_whatever_the_recurrence():
    from recurdepth.model.depth import dense_layers
    from recurdepth.train.flops import dense_flops_per_token, looped_flops

    cfg = load_config(TINY, [*SMALL, "model.kind=dense"])
    assert dense_layers(cfg) == 1 + 4 * 2 + 1
    flops = looped_flops(cfg, 384)
    expected = dense_flops_per_token(cfg, 384, 10)
    assert {flops.per_token(r, k) for r, k in ((1, 1), (4, 2), (9, 9))} == {expected}
    assert dense_layers(load_config(TINY, [*SMALL, "model.kind=dense", "model.num_layers=3"])) == 3


@pytest.mark.parametrize("overrides,needle", [
    (["model.kind=dense", "parallel.pipeline=2"], "parallel.pipeline=2 is invalid; model.kind=dense runs without"),
    (["model.kind=dense", "objective.kind=pause"], "objective.kind='pause' is invalid; model.kind=dense trains"),
    (["model.kind=dense", "model.num_experts=4"], "model.num_experts=4 is invalid; model.kind=dense builds dense"),
    (["model.kind=dense", "recurrence.checkpoint_iterations=true"], "no iterations to checkpoint"),
    (["model.num_layers=4"], "model.num_layers=4 is invalid; it sizes model.kind=dense only"),
    (["model.kind=dense", "model.num_layers=0"], "model.num_layers=0 is invalid; use 1 or more"),
])
def test_what_only_a_looped_model_has_is_refused_not_ignored(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(TINY, overrides)


def test_verbs_of_the_looped_model_refuse_a_dense_checkpoint_in_one_line(straight):
    from tests.conftest import assert_one_error

    ckpt = str(sorted((straight / "checkpoints").glob("step_*"))[-1])
    assert_one_error(run_cli(["generate", ckpt, "--prompt", "x", "--depth", "2"], check=False),
                     "model.kind=dense", "recurdepth generate runs looped models only")
    assert_one_error(run_cli(["export", ckpt, str(straight / "hf")], check=False), "model.kind='dense'")
    assert not (straight / "hf").exists()


def test_eval_scores_a_dense_checkpoint_once_for_every_depth(straight, tmp_path):
    import json

    out = tmp_path / "eval"
    res = run_cli(["eval", str(sorted((straight / "checkpoints").glob("step_*"))[-1]), "--depths", "1,4", "--n", "4",
                   "--valid-samples", "0", "--out", str(out)])
    assert "model.kind=dense: one pass per token" in res.stdout
    rows = [r for r in json.loads((out / "eval.json").read_text())["rows"] if r["metric"] == "accuracy"]
    by_depth = {d: sorted((r["task"], r["value"]) for r in rows if r["depth"] == d) for d in (1, 4)}
    assert by_depth[1] and by_depth[1] == by_depth[4]


def test_the_dense_decoder_returns_the_logits_of_the_newest_positions(straight, megatron_single_process):
    from recurdepth.infer.decoder import DecodeOptions, DenseDecoder, decoder_for
    from recurdepth.infer.loading import load_model

    model = load_model(sorted((straight / "checkpoints").glob("step_*"))[-1]).model
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    decoder = decoder_for(model, 2, 16, DecodeOptions(depth=3))
    assert isinstance(decoder, DenseDecoder)
    first, second = decoder.step(tokens[:, :9]), decoder.step(tokens[:, 9:])
    with torch.no_grad():
        full = model(tokens)
    assert first.shape[1] == 9 and second.shape[1] == 3
    assert torch.allclose(torch.cat([first, second], 1), full, atol=1e-5, rtol=0)
    assert [d.tolist() for d in decoder.depths] == [[1, 1], [1, 1]]
