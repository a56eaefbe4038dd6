"""`data.phases`: a data schedule (a retrofit's corpus phase, then corpus + procedural mix). From each phase's
`from_step` the run reads that phase's blend from its start; the schedule is a function of the step alone, so a
resumed run reads exactly what the uninterrupted one read. Bad phases are refused naming the key."""

from __future__ import annotations

import pytest
import torch

from recurdepth.config import load_config
from recurdepth.errors import ConfigError

MIX = [{"builtin": "stdlib-docs"}, {"procedural": "addition", "n": 64, "weight": 1.0}]


def phased_cfg(data_cache, *extra):
    return load_config(None, ["model.seq_length=64", "train.steps=6", "train.global_batch_size=4",
                              "train.micro_batch_size=2", f"data.cache_dir={data_cache}",
                              f"data.phases=[{{from_step: 3, sources: {MIX}}}]".replace("'", ""), *extra])


def test_each_step_reads_its_phases_blend_from_the_phase_start(megatron_single_process, data_cache):
    from recurdepth.data.pipeline import build_datasets, data_phases, micro_batches

    cfg = phased_cfg(data_cache)
    first = build_datasets(cfg, 24, 0, need_valid=False)
    phases = data_phases(cfg, first, True)
    assert [p.from_step for p in phases.phases] == [0, 3] and phases.phases[1].first_sample == 12
    assert phases.at(2) is phases.phases[0] and phases.at(3) is phases.at(5) is phases.phases[1]
    # step 3's batch (samples 12..15 of the run) is the mix's samples 0..3, as a run on the mix alone reads them
    alone = load_config(None, ["model.seq_length=64", "train.steps=3", "train.global_batch_size=4",
                               f"data.cache_dir={data_cache}", f"data.sources={MIX}".replace("'", "")])
    mix = build_datasets(alone, 12, 0, need_valid=False).train
    phase = phases.at(3)
    got = micro_batches(phase.train, 12 - phase.first_sample, 4, 2, 0, 1)
    want = micro_batches(mix, 0, 4, 2, 0, 1)
    assert all(torch.equal(a.tokens, b.tokens) and torch.equal(a.loss_mask, b.loss_mask) for a, b in zip(got, want))
    before = micro_batches(phases.at(2).train, 8, 4, 2, 0, 1)
    assert not torch.equal(before[0].tokens, got[0].tokens)
    # the procedural samples of the mix carry an answer-only loss mask: the phase really changed the data
    assert any(not bool(b.loss_mask.all()) for b in got)


@pytest.mark.parametrize("phases, needle", [
    ("[{from_step: 0, sources: [{builtin: stdlib-docs}]}]", "data.phases[0].from_step"),
    ("[{from_step: 9, sources: [{builtin: stdlib-docs}]}]", "before train.steps=6"),
    ("[{from_step: 4, sources: [{builtin: stdlib-docs}]}, {from_step: 2, sources: [{builtin: stdlib-docs}]}]",
     "data.phases[1].from_step"),
    ("[{from_step: 2, source: [{builtin: stdlib-docs}]}]", "exactly from_step and sources"),
    ("[{from_step: 2, sources: [{procedural: addition, wieght: 1}]}]", "data.phases[0].sources[0].wieght"),
    ("[{from_step: 2, sources: []}]", "data.phases[0].sources"),
])
def test_bad_phases_are_refused_naming_the_key(phases, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.steps=6", f"data.phases={phases}"])
    assert needle in str(err.value)
