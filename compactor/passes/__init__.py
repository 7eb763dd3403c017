"""Passes: one module per pass, registered by name (the contract is in ``passes.base``).

Importing this package must stay light: heavy libraries are imported inside ``run``.
"""

from __future__ import annotations

from compactor.passes.base import (
    Pass,
    PassConfig,
    Reference,
    RunContext,
    StageKind,
    Step,
    get_pass,
    register,
    registry,
)

__all__ = ["Pass", "PassConfig", "Reference", "RunContext", "StageKind", "Step", "get_pass",
           "register", "registry"]

# Registration happens on import; these modules import nothing heavy at module level.
# Not sorted (I001): registration order is the order error hints list the passes in.
from compactor.passes import export as _export  # noqa: E402,F401,I001
from compactor.passes import quantize as _quantize  # noqa: E402,F401
from compactor.passes import distill as _distill  # noqa: E402,F401
from compactor.passes import prune as _prune  # noqa: E402,F401
