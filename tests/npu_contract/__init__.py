"""Contract tests for the Ascend NPU path: Huawei's own meta (shape/dtype/limit) functions from the
torch-npu wheel, run on CPU against ``device="meta"`` tensors.  See ``harness.py``."""
