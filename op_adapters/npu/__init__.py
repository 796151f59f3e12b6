"""The Ascend NPU backend: torch-npu implementations registered beside the reference ops.

Importing this package imports nothing from torch_npu; see ``ops`` for the adapters and ``chips``
for the per-chip capability table.
"""

from ..registry import register
from .chips import CAPABILITIES, FAMILIES, capability_rows, current_family, use_chip
from .ops import IMPLEMENTATIONS

for _op, (_fn, _supports) in IMPLEMENTATIONS.items():
    register(_op, "npu", supports=_supports)(_fn)

__all__ = ["CAPABILITIES", "FAMILIES", "IMPLEMENTATIONS", "capability_rows", "current_family", "use_chip"]
