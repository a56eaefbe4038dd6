"""Errors meant for people: one line naming the cause and the fix; the CLI turns them into exit status 2."""


class RecurdepthError(Exception):
    """Base class of every error the CLI reports as `error: <message>` with exit status 2. Errors decided from
    shared state (config, files, an agreed verdict) are raised with the same text on every rank and printed by
    rank 0 only; an error only one rank can see sets `same_on_every_rank = False`."""

    same_on_every_rank = True


class ConfigError(RecurdepthError):
    """The configuration is invalid (unknown key, wrong type, impossible value or layout)."""


class DataError(RecurdepthError):
    """Input data is missing, empty or corrupt."""


class CheckpointError(RecurdepthError):
    """A checkpoint is missing, incomplete or does not match the configuration."""


class TrainingHalted(RecurdepthError):
    """Training stopped on a bad step (non-finite loss or gradient, loss spike) with `on_bad_step=halt`."""
