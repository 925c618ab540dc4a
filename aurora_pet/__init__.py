"""aurora-pet: parameter-efficient fine-tuning by CP mode approximation with shared factors."""

from .config import AuroraConfig
from .errors import AdapterFileError, AuroraConfigError, AuroraError, MergeError, TargetError
from .factors import ModeFactors, compress_delta, num_factor_parameters
from .families import all_presets, get_preset
from .model import AuroraModel, get_aurora_model

__all__ = [
    "AdapterFileError", "AuroraConfig", "AuroraConfigError", "AuroraError", "AuroraModel", "MergeError",
    "ModeFactors", "TargetError", "all_presets", "compress_delta", "get_aurora_model", "get_preset",
    "num_factor_parameters",
]
__version__ = "0.2.0.dev0"


def __getattr__(name: str):
    """`AuroraPeftConfig` on first use: it imports peft and registers Aurora with it
    (`aurora_pet.integrations.peft`); `import aurora_pet` alone imports neither."""
    if name == "AuroraPeftConfig":
        from .integrations.peft import AuroraPeftConfig

        return AuroraPeftConfig
    raise AttributeError(f"module 'aurora_pet' has no attribute {name!r}")
