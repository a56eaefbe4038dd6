"""The engine seam, in-process: a step needs nothing of an engine but its verbs (a fake engine drives
`step.optimizer_step`), checkpoints ask the engine for its state and name, and the run-control callbacks act on
their hooks (interval and final saves, evaluation, the agreed stop)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from recurdepth.model.depth import BackpropWindow
from recurdepth.objectives.base import Objective
from recurdepth.train.engine.base import Engine

VERBS = {"prepare", "backward", "reduce_gradients", "grads_finite", "step", "model", "device"}


class FakeEngine(Engine):
    """A linear model with SGD; every verb is logged."""

    name = "fake"

    def __init__(self, finds_bad: str | None = None):
        torch.manual_seed(0)
        self.model, self.device = torch.nn.Linear(3, 1), torch.device("cpu")
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.5)
        self.scheduler = FakeScheduler()
        self.calls: list = []
        self.finds_bad = finds_bad

    def prepare(self, tokens):
        self.calls.append(("prepare", float(tokens)))
        self.optimizer.zero_grad()

    def backward(self, loss, last):
        self.calls.append(("backward", last))
        loss.backward()

    def reduce_gradients(self, tokens):
        self.calls.append(("reduce_gradients", float(tokens)))
        for p in self.model.parameters():
            p.grad /= tokens

    def grads_finite(self):
        self.calls.append(("grads_finite",))
        return all(bool(torch.isfinite(p.grad).all()) for p in self.model.parameters())

    def step(self, bad):
        self.calls.append(("step", bad))
        bad = bad or self.finds_bad
        if bad is not None:
            return float("nan"), bad
        self.optimizer.step()
        return 1.0, None

    def save_state(self, tmp, common):
        torch.save({"model": self.model.state_dict(), **common}, tmp / "common.pt")

    def load_state(self, path, meta):
        loaded = torch.load(path / "common.pt", weights_only=False)
        self.model.load_state_dict(loaded["model"])
        return loaded


class FakeScheduler:
    def __init__(self):
        self.num_steps = 0

    def state_dict(self):
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state):
        self.num_steps += state["num_steps"]


class Seen:
    """Forwards attribute reads to the engine, recording their names."""

    def __init__(self, inner):
        self.__dict__["_inner"], self.__dict__["names"] = inner, set()

    def __getattr__(self, name):
        self.names.add(name)
        return getattr(self._inner, name)


class Toy(Objective):
    kind = "toy"

    def __init__(self):
        super().__init__(None, None)

    def loss_sum(self, model, mb, window, collect_health=False):
        return (model(mb.x).squeeze(-1) * mb.loss_mask).sum()


def batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [SimpleNamespace(x=torch.randn(4, 3, generator=g), loss_mask=(torch.rand(4, generator=g) > 0.3).float())
            for _ in range(n)]


def step(engine, faults=None, guard=None):
    from recurdepth.train.faults import FaultInjector
    from recurdepth.train.guards import NumericalGuard
    from recurdepth.train.step import optimizer_step

    faults = faults or FaultInjector(engine.model, engine.device)
    faults.begin(1)
    return optimizer_step(engine, Toy(), guard or NumericalGuard(3, 0.0), faults, None, batches(),
                          BackpropWindow(1, 1))


def test_a_step_drives_the_engine_through_its_verbs_alone(megatron_single_process):
    engine = FakeEngine()
    reference = torch.nn.Linear(3, 1)
    reference.load_state_dict(engine.model.state_dict())
    seen = Seen(engine)
    out = step(seen)
    assert seen.names <= VERBS, seen.names - VERBS
    tokens = float(sum(mb.loss_mask.sum() for mb in batches()))
    assert engine.calls == [("prepare", tokens), ("backward", False), ("backward", False), ("backward", True),
                            ("reduce_gradients", tokens), ("grads_finite",), ("step", None)]
    # the update is the token mean's: summed losses over the global token count
    total = sum(Toy().loss_sum(reference, mb, None) for mb in batches())
    assert out.loss == pytest.approx(float(total) / tokens) and out.bad is None and out.grad_norm == 1.0
    (total / tokens).backward()
    with torch.no_grad():
        for p, q in zip(reference.parameters(), engine.model.parameters()):
            torch.testing.assert_close(p - 0.5 * p.grad, q)


def test_a_rejected_step_reaches_the_engine_as_its_verdict(megatron_single_process, monkeypatch):
    from recurdepth.train.faults import NAN_LOSS_ENV, FaultInjector

    monkeypatch.setenv(NAN_LOSS_ENV, "1")
    engine = FakeEngine()
    before = [p.detach().clone() for p in engine.model.parameters()]
    out = step(engine, faults=FaultInjector(engine.model, engine.device))
    assert engine.calls[-1] == ("step", "non-finite loss (nan)") and out.bad == "non-finite loss (nan)"
    assert math.isnan(out.grad_norm) and all(torch.equal(a, b) for a, b in zip(before, engine.model.parameters()))
    # a verdict the engine reaches itself (DeepSpeed's overflow check) is the step's
    monkeypatch.delenv(NAN_LOSS_ENV)
    assert step(FakeEngine(finds_bad="non-finite gradient norm")).bad == "non-finite gradient norm"


def test_checkpoints_ask_the_engine_for_its_state_and_name(megatron_single_process, tmp_path):
    from recurdepth.errors import CheckpointError
    from recurdepth.train.checkpoint import load_checkpoint, manifest, save_checkpoint
    from recurdepth.train.state import TrainState

    engine = FakeEngine()
    engine.scheduler.num_steps = 7
    saved = save_checkpoint(tmp_path, TrainState(step=7, consumed_samples=56), engine.model, engine.optimizer,
                            engine.scheduler, {"model": {}}, engine=engine)
    assert manifest(saved)["engine"] == "fake"
    other = FakeEngine()
    with torch.no_grad():
        other.model.weight.add_(1.0)
    other.scheduler.num_steps = 3  # a live schedule (a rollback's): it ends at the saved count, not 3 + 7
    state, _ = load_checkpoint(saved, other.model, other.optimizer, other.scheduler, engine=other)
    assert (state.step, state.consumed_samples, other.scheduler.num_steps) == (7, 56, 7)
    assert torch.equal(other.model.weight, engine.model.weight)
    with pytest.raises(CheckpointError, match="written by the fake engine"):  # the default: megatron's format
        load_checkpoint(saved, other.model, other.optimizer, other.scheduler)


def fake_trainer(total: int):
    from recurdepth.train.state import TrainState

    trainer = SimpleNamespace(state=TrainState(), saves=[], evals=[], last_saved=None, is_logger=False,
                              device=torch.device("cpu"), cfg=SimpleNamespace(train=SimpleNamespace(steps=total)))

    def save():
        trainer.saves.append(trainer.state.step)
        trainer.last_saved = trainer.state.step
        return trainer.last_saved

    trainer.save = save
    trainer.evaluate = lambda: {"loss": 1.0}
    trainer.emit = lambda hook, *args: trainer.evals.append(args) if hook == "on_eval" else None
    return trainer


def run(trainer, callbacks, total: int):
    for cb in callbacks:
        cb.on_train_start(trainer)
    try:
        while trainer.state.step < total:
            trainer.state.step += 1
            if [r for r in [cb.on_step_end(trainer, None) for cb in callbacks] if r]:
                break
        for cb in callbacks:
            cb.on_train_end(trainer)
    finally:
        for cb in callbacks:
            cb.close()


@pytest.mark.parametrize("interval,saves", [(2, [2, 4, 5]), (5, [5]), (0, [5])])
def test_checkpointing_saves_at_the_interval_and_once_at_the_end(interval, saves):
    from recurdepth.train.callbacks import Checkpointing, Evaluation

    trainer = fake_trainer(5)
    run(trainer, [Evaluation(2), Checkpointing(interval, True, 5)], 5)
    assert trainer.saves == saves and trainer.evals == [(2, {"loss": 1.0}), (4, {"loss": 1.0})]


def test_an_agreed_stop_saves_and_ends_the_run_after_that_step(megatron_single_process, monkeypatch):
    from recurdepth.train import guards
    from recurdepth.train.callbacks import Checkpointing, StopOnRequest

    monkeypatch.setattr(guards, "STOPPED", None)  # the process's agreed stop, set by this one
    trainer = fake_trainer(50)
    stop = StopOnRequest(1e-9, [], 50)  # the time budget is spent by the first agreement
    run(trainer, [Checkpointing(0, True, 50), stop], 50)
    assert trainer.state.step == 1 and trainer.saves == [1] and stop.request is None  # handlers restored


def test_a_checkpoint_saved_with_every_kinds_objective_options_resumes_under_its_kind():
    """Configs saved before the objective section was per kind list every kind's options: under the same kind
    they are no change; a changed option of the kind, or a changed kind, still is."""
    from recurdepth.config import load_config
    from recurdepth.train.checkpoint import config_changes

    current = load_config(None, []).to_dict()
    legacy = {**current, "objective": {"kind": "lm", "thought_length": 8, "n_ahead": 4, "pause_fraction": 0.1,
                                       "coconut_max_stage": 3}}
    assert config_changes(legacy, current) == []
    pause = load_config(None, ["objective.kind=pause", "objective.pause_fraction=0.2"]).to_dict()
    legacy_pause = {**pause, "objective": {**legacy["objective"], "kind": "pause"}}
    assert config_changes(legacy_pause, pause) == ["objective.pause_fraction: checkpoint 0.1, config 0.2"]
    assert config_changes(legacy, pause) == ["objective.kind: checkpoint 'lm', config 'pause'",
                                             "objective.pause_fraction: checkpoint 0.1, config 0.2"]
