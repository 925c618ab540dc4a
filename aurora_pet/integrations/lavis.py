"""Where 0.1 documented the LAVIS helpers; they live in `aurora_pet.families.lavis` now (deprecated alias)."""

import warnings

from ..families.lavis import FAMILY
from ..families.lavis.build import *  # noqa: F401,F403
from ..families.lavis.build import __all__ as _build_all
from ..families.lavis.wrap import load_blip_adapter, wrap_blip

warnings.warn("aurora_pet.integrations.lavis is deprecated: use aurora_pet.families.lavis.build (build_blip, "
              "load_checkpoint) and aurora_pet.families.lavis.wrap (wrap_blip, load_blip_adapter)",
              DeprecationWarning, stacklevel=2)

momentum_pairs = FAMILY.momentum_pairs
architecture_of = FAMILY.architecture

__all__ = [*_build_all, "architecture_of", "load_blip_adapter", "momentum_pairs", "wrap_blip"]
