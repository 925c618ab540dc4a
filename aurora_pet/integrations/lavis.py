"""Where 0.1 documented the LAVIS helpers; they live in `aurora_pet.families.lavis` now."""

from ..families.lavis import FAMILY
from ..families.lavis.build import *  # noqa: F401,F403
from ..families.lavis.build import __all__ as _build_all
from ..families.lavis.wrap import load_blip_adapter, wrap_blip

momentum_pairs = FAMILY.momentum_pairs
architecture_of = FAMILY.architecture

__all__ = [*_build_all, "architecture_of", "load_blip_adapter", "momentum_pairs", "wrap_blip"]
