"""aurora-pet: parameter-efficient fine-tuning by CP mode approximation with shared factors."""

from .config import AuroraConfig
from .errors import AdapterFileError, AuroraConfigError, AuroraError, MergeError, TargetError
from .factors import ModeFactors, compress_delta, num_factor_parameters
from .model import AuroraModel, get_aurora_model
from .presets import PRESETS, get_preset

__all__ = [
    "AdapterFileError", "AuroraConfig", "AuroraConfigError", "AuroraError", "AuroraModel", "MergeError",
    "ModeFactors", "PRESETS", "TargetError", "compress_delta", "get_aurora_model", "get_preset",
    "num_factor_parameters",
]
__version__ = "0.1.0"
