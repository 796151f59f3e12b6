"""ascend-v4: DeepSeek V4 (Flash, Pro) in device-agnostic PyTorch, with Ascend NPU dispatch.

Model code in this package calls ops only through :mod:`op_adapters`.
"""

from .config import ConfigError, ModelConfig, load_config, preset_names
from .generate import GenerationResult, generate
from .loader import load_model
from .model import V4Model
from .rope import layer_frequencies, rope_tables

__version__ = "0.1.0"

__all__ = ["ConfigError", "ModelConfig", "V4Model", "GenerationResult", "generate", "load_config", "load_model",
           "preset_names", "rope_tables", "layer_frequencies", "__version__"]
