"""The one megatron-core version gate for every patch in `recurdepth/compat/`.

Each module here that patches or works around megatron-core internals calls `check_megatron_version()`
before it touches megatron (the table of patches is in `recurdepth/compat/__init__.py`). An untested version
is refused with one line naming the installed and the tested versions; RECURDEPTH_ALLOW_UNTESTED_MEGATRON=1
downgrades that to a warning.
"""

from __future__ import annotations

import os
import warnings

from recurdepth.errors import RecurdepthError

__all__ = ["ALLOW_UNTESTED_ENV", "TESTED_MEGATRON_VERSIONS", "CompatError", "check_megatron_version",
           "megatron_version"]

TESTED_MEGATRON_VERSIONS: tuple[str, ...] = ("0.16.0", "0.16.1")
ALLOW_UNTESTED_ENV = "RECURDEPTH_ALLOW_UNTESTED_MEGATRON"


class CompatError(RecurdepthError, RuntimeError):
    """A compatibility patch cannot be applied (the message is one line: cause and fix; the CLI prints it as
    `error: ...` with exit status 2, like every other refusal)."""


def megatron_version() -> str:
    try:
        from megatron.core import package_info
    except ImportError as exc:
        raise CompatError(
            f"megatron-core is not importable ({exc}); install megatron-core=="
            f"{TESTED_MEGATRON_VERSIONS[-1]}"
        ) from None
    return str(package_info.__version__)


def check_megatron_version(what: str = "recurdepth's megatron patches") -> None:
    """Raise CompatError unless the installed megatron-core is one `what` was tested with."""
    version = megatron_version()
    if version.split("+")[0] in TESTED_MEGATRON_VERSIONS:
        return
    msg = (
        f"megatron-core {version} is untested with {what} (tested: "
        f"{', '.join(TESTED_MEGATRON_VERSIONS)}); install megatron-core=="
        f"{TESTED_MEGATRON_VERSIONS[-1]}, or set {ALLOW_UNTESTED_ENV}=1 to try anyway"
    )
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return
    raise CompatError(msg)
