"""Numerics tooling: ``ascend-v4 dump`` (record V4's intermediate tensors) and ``ascend-v4 compare``
(match two dumps tensor by tensor under dtype-aware rules and name the first layer that differs).

The workflow mirrors MindStudio Probe's dump-then-compare habit: dump on the Ascend host, copy the
run directory anywhere, dump the reference there (or earlier), compare.  See docs/numerics.md.
"""

# The submodules ``dump`` and ``compare`` keep their names here; their main functions are exported
# as ``dump_run`` / ``compare_dirs``.
from .compare import (CompareRefused, Comparison, compare_runs, compare_tensor, load_rules, load_run,
                      write_report)
from .compare import compare as compare_dirs
from .dump import DUMP_FORMAT, MANIFEST_FILE, dump_model, state_hash, weights_identity
from .dump import dump as dump_run

__all__ = ["CompareRefused", "Comparison", "DUMP_FORMAT", "MANIFEST_FILE", "compare_dirs", "compare_runs",
           "compare_tensor", "dump_model", "dump_run", "load_rules", "load_run", "state_hash", "weights_identity",
           "write_report"]
