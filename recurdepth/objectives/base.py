"""What an objective is to the rest of recurdepth: a plug-in that owns its config section, its data transform,
its extra modules, its loss and its metrics. The trainer, the data pipeline and the model builder call only
these methods; none of them names an objective.

Adding one is one file (a subclass of `Objective`) plus one line in `recurdepth/objectives/registry.py`
(or `register_objective(kind, cls)` at run time, e.g. from a test or a user's package).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # torch-free at import: config.py builds `objective` sections from this module
    import torch

    from recurdepth.model.depth import BackpropWindow


@dataclass
class ObjectiveSection:
    """The `objective` config section of an objective without options of its own. An objective with options
    subclasses it (a dataclass: fields with defaults) and validates them in `validate`."""

    kind: str = "lm"

    def validate(self, cfg) -> None:
        """Raise ConfigError (one line: key, value, fix) for values this objective cannot train with; `cfg` is the
        whole Config (model, parallel layout, ...)."""


class Objective:
    """One micro-batch -> the *sum* of its token losses, and how many tokens that sum counts.

    Class attributes: `kind` (the `objective.kind` name) and `Section` (its config dataclass).
    Hooks with defaults (override what applies):
      `datasets(cfg, tokenizer, train_samples, valid_samples)` (classmethod) its own (train, valid) data, or
                                                            None for the blended pipeline's;
      `reserved_positions(cfg)`                             (classmethod) positions of each sequence it fills;
      `procedural_options(cfg, tokenizer)`                  (classmethod) options for writing procedural samples;
      `transform_dataset(cfg, tokenizer, dataset, split)`  (classmethod) the data this objective trains on;
      `extra_modules(cfg, first_stage, last_stage)`         (classmethod) weights it adds to the model, by name;
      `trainable(cfg, name)`                                (classmethod) False freezes parameter `name`;
      `bind(model)`                                         the model it runs through (the trainer calls it once);
      `set_step(step)`                                      the optimizer step about to run (curricula);
      `sample_depths(dataset, sample_ids)`                  per-sample r (FLOPs, progress line), or None;
      `pipeline_run(model, batches, window)`               overridden: under PP it runs its own passes
                                                            (`multi_pass`), else the looped schedule runs it;
      `metrics()`                                           floats logged with the step.
    """

    kind: str = "lm"
    Section: type = ObjectiveSection

    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer

    # ------------------------------------------------------------------ config, data, modules

    @classmethod
    def datasets(cls, cfg, tokenizer, train_samples: int, valid_samples: int) -> Optional[tuple]:
        """(train, valid) datasets of the objective's own making, or None: the blended pipeline's."""
        return None

    @classmethod
    def reserved_positions(cls, cfg) -> int:
        """Positions of every training sequence this objective fills itself (the corpora give seq_length - n)."""
        return 0

    @classmethod
    def procedural_options(cls, cfg, tokenizer) -> dict:
        """Keyword arguments for writing procedural samples (`prepare_procedural_corpus`)."""
        return {}

    @classmethod
    def transform_dataset(cls, cfg, tokenizer, dataset, split: str):
        """The dataset this objective trains on, built from the pipeline's `dataset` of `split` ("train" or
        "valid"). Default: unchanged."""
        return dataset

    @classmethod
    def packs_sources(cls, cfg) -> bool:
        """Whether text sources are packed into sequences (False: one step-by-step problem per sample)."""
        return True

    @classmethod
    def extra_modules(cls, cfg, first_stage: bool, last_stage: bool) -> dict[str, torch.nn.Module]:
        """Submodules registered on the model at construction (so DDP, the optimizer and checkpoints see them)."""
        return {}

    @classmethod
    def trainable(cls, cfg, name: str) -> bool:
        """Whether the model's parameter `name` (its global name, e.g. `core.0.mlp.linear_fc1.weight`) trains;
        frozen ones get `requires_grad=False` before the engine wraps the model, so DDP, the optimizer and the
        gradient norm leave them out. Default: every parameter trains."""
        return True

    # ------------------------------------------------------------------ the step

    @property
    def multi_pass(self) -> bool:
        """Whether it runs several model passes per micro-batch (it overrides `pipeline_run`): under pipeline
        parallelism it then drives the stages itself; single-pass objectives run in the looped schedule."""
        return type(self).pipeline_run is not Objective.pipeline_run

    def bind(self, model) -> None:
        """The (engine-wrapped) model this objective's losses run through; the trainer binds it once, so hooks
        without a model argument (`pipeline_loss`) can reach the objective's extra modules (`unwrap(self.model)`)."""
        self.model = model

    def set_step(self, step: int) -> None:
        """The optimizer step about to run."""

    def loss_sum(self, model, mb, window: BackpropWindow, collect_health: bool = False) -> torch.Tensor:
        """Summed loss of one micro-batch (a scalar with its graph) through `model` (whole, one stage)."""
        raise NotImplementedError

    def loss_tokens(self, mb) -> torch.Tensor:
        """How many tokens `loss_sum` of this micro-batch counts (the normaliser's share)."""
        return mb.loss_mask.sum()

    def pipeline_loss(self, per_token: torch.Tensor, mb) -> torch.Tensor:
        """Under the looped pipeline schedule (single-pass objectives): the summed loss from the head's
        per-token loss `[b, s]`."""
        raise NotImplementedError(f"objective {self.kind} has no single-pass pipeline loss")

    def pipeline_readouts(self, window: BackpropWindow) -> Optional[list]:
        """Under the looped pipeline schedule: the iterations whose states the last stage reads out (coda, final
        norm, head) for `pipeline_readout_loss`, or None for the plain head after iteration r."""
        return None

    def pipeline_readout_loss(self, picked: list, losses: torch.Tensor, hidden: torch.Tensor, mb) -> torch.Tensor:
        """The summed loss of one micro-batch from the readouts of iterations `picked`: per-token losses `[n, b, s]`
        and final-norm hidden `[n, b, s, h]` (the same as `loss_sum` computes from `readout_forward`)."""
        raise NotImplementedError(f"objective {self.kind} reads out only after iteration r")

    def pipeline_run(self, model, batches: list, window: BackpropWindow) -> Optional[torch.Tensor]:
        """Multi-pass objectives under PP: forward and backward of this rank's micro-batches; the summed loss on
        the last stage, zero elsewhere."""
        raise NotImplementedError(f"objective {self.kind} is single-pass: the looped schedule runs it")

    def sample_depths(self, dataset, sample_ids) -> Optional[list]:
        """Per-sample depth: the r each of the samples `sample_ids` of `dataset` runs (the step's FLOPs and
        progress line count them), or None when the whole step runs the sampler's r."""
        return None

    def metrics(self) -> dict[str, float]:
        """Extra per-step metrics (logged with the step's health values)."""
        return {}


class TokenMeans:
    """Per-token quantities summed over a step's micro-batches and reported as token means (an objective's
    `metrics`): `add(tokens, *sums)` per micro-batch, `pop()` -> {name: sum / tokens} (then empty), `reset()`."""

    def __init__(self, *names: str):
        self.names, self._sums = names, None

    def add(self, tokens: "torch.Tensor", *sums: "torch.Tensor") -> None:
        import torch

        row = torch.stack([*(s.detach() for s in sums), tokens.detach().to(sums[0].dtype)])
        self._sums = row if self._sums is None else self._sums + row

    def reset(self) -> None:
        self._sums = None

    def pop(self) -> dict[str, float]:
        if self._sums is None:
            return {}
        means = (self._sums[:-1] / self._sums[-1].clamp_min(1)).tolist()
        self._sums = None
        return dict(zip(self.names, means))

