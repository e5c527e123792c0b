"""The optional installs (pyproject's extras) each command needs, checked before it loads or binds anything:
`pip install zimage-split` is the SDK and the client commands; each service role adds its own stack."""

from __future__ import annotations

import importlib.util

from zimage_split.common.errors import MISSING_EXTRA, FailedPrecondition

# The modules of each extra that our code imports; pyproject.toml lists the packages that provide them
# (tests/unit/test_deploy_consistency.py holds the two together).
EXTRA_MODULES = {
    "encoder": ("torch", "transformers"),
    "generator": ("torch", "diffusers", "transformers", "peft", "accelerate"),
    "ray": ("ray",),
    "http": ("fastapi", "uvicorn", "python_multipart"),
    "int8": ("torchao",),
}


def missing_modules(*extras: str) -> list[str]:
    """The modules `extras` provide that this install lacks, in order and without repeats."""
    wanted = dict.fromkeys(module for extra in extras for module in EXTRA_MODULES[extra])
    return [module for module in wanted if importlib.util.find_spec(module) is None]


def require(*extras: str, what: str) -> None:
    """Raises FailedPrecondition (reason "missing-extra") naming the pip install that brings what `what`
    needs, e.g. require("generator", what="zsplit serve generator")."""
    missing = missing_modules(*extras)
    if missing:
        raise FailedPrecondition(
            f"{what} needs {', '.join(missing)}, which this install lacks (`pip install zimage-split` alone "
            f"is the client). Install it with: pip install 'zimage-split[{','.join(extras)}]'",
            reason=MISSING_EXTRA,
        )
