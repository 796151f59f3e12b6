"""Install the three packages of ascend-v4 (ascend_v4, op_adapters, fallbacks) and the CLI."""

from setuptools import find_packages, setup

setup(
    name="ascend-v4",
    version="0.1.0",
    description="DeepSeek V4 (Flash, Pro) in device-agnostic PyTorch with Ascend NPU dispatch and reference numerics",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["ascend_v4", "ascend_v4.*", "op_adapters", "op_adapters.*",
                                    "fallbacks", "fallbacks.*"]),
    package_data={"ascend_v4.presets": ["*.yaml"], "ascend_v4.numerics": ["*.yaml"]},
    install_requires=[
        # tested with 2.13.0 (CI) ; torch-npu X pairs with torch X, so the npu extra pins the same range
        "torch>=2.13,<2.15",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        # Only on Ascend hosts with CANN installed and its set_env.sh sourced: on any other machine
        # installing torch-npu makes `import torch` fail unless TORCH_DEVICE_BACKEND_AUTOLOAD=0.
        "npu": ["torch-npu>=2.13,<2.15"],
        "tokenizer": ["tokenizers>=0.15"],
        "plot": ["matplotlib>=3.7"],
        "dev": ["pytest>=8", "tokenizers>=0.15", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["ascend-v4=ascend_v4.cli:main"]},
)
