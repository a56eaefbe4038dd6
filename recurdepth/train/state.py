"""Plain data the trainer, the checkpoint code and the callbacks share, below all of them (no imports from
`recurdepth.train`): where training stands (`TrainState`, saved in every checkpoint), which line of saves a
run belongs to (`Lineage`) and what `Trainer.fit` returns (`TrainResult`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    consumed_samples: int = 0
    skipped_batches: list = field(default_factory=list)  # consumed-sample offsets of batches never to train on


@dataclass
class Lineage:
    """Which line of saves a checkpoint belongs to: `run_id` is shared by every checkpoint of one lineage,
    `parent` names the checkpoint this process resumed from (None for a fresh start), which retention never
    removes while this process runs."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    parent: Optional[str] = None


@dataclass
class TrainResult:
    losses: list = field(default_factory=list)
    depths: list = field(default_factory=list)
    final_step: int = 0
    checkpoint: Optional[Path] = None
