# ---------------------------------------------------------------------------------------------
# Fresh random seeds for the op tests (tests/test_ops_*.py).
#
# Every run draws a new base seed (never a fixed one), so the op tests see fresh random inputs each
# time.  Each test gets its own torch.Generator seeded from (base seed, test id) and prints the seed
# in its captured setup output, which pytest shows when the test fails.  To reproduce a failing run,
# set ASCEND_V4_TEST_SEED to the base seed it printed.
# ---------------------------------------------------------------------------------------------
import os as _ops_os
import secrets as _ops_secrets
import zlib as _ops_zlib

import pytest as _ops_pytest
import torch as _ops_torch

_OPS_SEED_ENV = "ASCEND_V4_TEST_SEED"
_OPS_BASE_SEED = int(_ops_os.environ.get(_OPS_SEED_ENV) or _ops_secrets.randbits(32))


@_ops_pytest.fixture
def torch_gen(request) -> _ops_torch.Generator:
    """A torch.Generator with a fresh per-run seed; the seed is printed (shown on failure)."""
    seed = (_OPS_BASE_SEED * 1_000_003 + _ops_zlib.crc32(request.node.nodeid.encode())) % (2 ** 63)
    print(f"[seed] {request.node.nodeid}: generator seed {seed}; "
          f"reproduce this run with {_OPS_SEED_ENV}={_OPS_BASE_SEED}")
    return _ops_torch.Generator().manual_seed(seed)
