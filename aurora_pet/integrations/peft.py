"""Aurora as a PEFT method: `peft.get_peft_model(model, AuroraPeftConfig(...))`, `PeftModel.from_pretrained`,
Trainer checkpoints through PEFT, and PEFT's multi-adapter calls, on the same core.

This module only translates: `AuroraTuner` (PEFT's tuner, what `PeftModel.base_model` is) keeps an
`AuroraModel` of the same base model, which injects, switches, merges and unloads exactly as it does
without PEFT; its adapters' parameters are registered on the tuner (`aurora_adapters.<name>.…`), so PEFT's
state dicts, `.to()` and optimisers see them. The task heads (`modules_to_save`) are PEFT's: wrapped in its
`ModulesToSaveWrapper`, one copy per adapter, saved and loaded by PEFT.

Importing this module registers the method with PEFT (`register_peft_method`, as PEFT's own tuners do on
import). PEFT finds methods by a `PeftType` member and its enum lists only its own methods, so the member
`PeftType.AURORA` is added to it first. Importing `aurora_pet` does not import this module (nor peft);
`aurora_pet.AuroraPeftConfig` does. `PeftModel.from_pretrained` of an Aurora adapter needs that import
first, in the same process.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .. import adapter_files
from ..atomic import atomic_files
from ..config import AuroraConfig
from ..families import family_of
from ..model import AuroraModel
from ..targets import resolve_targets

try:
    import peft
    from peft import PeftConfig, PeftType
    from peft.tuners.tuners_utils import BaseTuner, _delete_auxiliary_adapter, _set_adapter
    from peft.utils.other import AuxiliaryTrainingWrapper, set_additional_trainable_modules
except ImportError as error:  # pragma: no cover - the HF environment has peft
    raise ImportError("aurora_pet.AuroraPeftConfig needs peft: pip install 'aurora-pet[hf]' "
                      f"(or pip install peft) ({error})") from None

try:
    from peft.utils import register_peft_method
except ImportError:  # pragma: no cover - peft < 0.15
    raise ImportError(f"peft {peft.__version__} has no register_peft_method (added in peft 0.15); upgrade peft, or "
                      "use aurora_pet.get_aurora_model without PEFT") from None

NAME = "aurora"
PREFIX = "aurora_"
_ADAPTERS = "aurora_adapters"  # the tuner's attribute holding the adapters' parameters


def _aurora_peft_type() -> PeftType:
    """`PeftType.AURORA`, added to peft's enum the first time (peft looks methods up by this member)."""
    if NAME.upper() in PeftType.__members__:
        return PeftType[NAME.upper()]
    member = str.__new__(PeftType, NAME.upper())
    member._name_ = member._value_ = NAME.upper()
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_names_.append(member._name_)
    PeftType._member_map_[member._name_] = member
    PeftType._value2member_map_[member._value_] = member
    type.__setattr__(PeftType, member._name_, member)
    return member


AURORA = _aurora_peft_type()


def _peft_config_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    """AuroraConfig's fields, as fields of the PEFT config (one definition of the options: AuroraConfig's)."""
    return [(f.name, Optional[Any], dataclasses.field(default=f.default)) for f in dataclasses.fields(AuroraConfig)]


def _post_init(self: "AuroraPeftConfig") -> None:
    PeftConfig.__post_init__(self)
    self.peft_type = AURORA
    self.aurora_config()  # validates every field, naming it


def _aurora_config(self: "AuroraPeftConfig", **overrides: Any) -> AuroraConfig:
    """The core's config with the same options (`overrides` replace some)."""
    values = {f.name: getattr(self, f.name) for f in dataclasses.fields(AuroraConfig)}
    return AuroraConfig(**{**values, **overrides})


AuroraPeftConfig = dataclasses.make_dataclass(
    "AuroraPeftConfig", _peft_config_fields(), bases=(PeftConfig,),
    namespace={"__post_init__": _post_init, "aurora_config": _aurora_config, "__module__": __name__,
               "__doc__": "PEFT's config for Aurora: the options of `AuroraConfig` (same names, defaults and "
                          "checks) plus PEFT's own (`task_type`, `inference_mode`, ...).\n\n"
                          + (AuroraConfig.__doc__ or "").split("\n", 2)[-1]})


class AuroraTuner(BaseTuner):
    """PEFT's tuner for Aurora: PEFT's calls on its `base_model`, carried out by an `AuroraModel`."""

    prefix = PREFIX

    def __init__(self, model: nn.Module, config: Any, adapter_name: str, low_cpu_mem_usage: bool = False,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    @property
    def aurora(self) -> AuroraModel:
        return self.__dict__["_aurora"]

    # -- injection -------------------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Add adapter `adapter_name` (the first one wraps `model`); its heads become PEFT's modules_to_save."""
        config = self.peft_config[adapter_name]
        core = config.aurora_config(modules_to_save=[])
        if config.modules_to_save is None:  # the preset's heads, trained by PEFT's wrapper
            heads = resolve_targets(model, config.aurora_config(), family_of(model)).modules_to_save
            config.modules_to_save = heads or None
        if "_aurora" not in self.__dict__:
            aurora = AuroraModel(model, core, adapter_name=adapter_name)
            self.__dict__["_aurora"] = aurora
            setattr(self, _ADAPTERS, aurora.aurora_adapters)  # registered here: PEFT's state dicts see them
        else:
            self.aurora.add_adapter(adapter_name, core)
        self.targeted_module_names = list(self.aurora.aurora_adapters[adapter_name].layers)
        set_additional_trainable_modules(model=model, peft_config=config, model_config=self.get_model_config(model),
                                         adapter_name=adapter_name, activate_adapter=adapter_name in self.active_adapters)
        if config.inference_mode:
            self.aurora.aurora_adapters[adapter_name].set_trainable(False)

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("Aurora does not replace modules one by one: its adapters are injected by inject_adapter "
                        "(AuroraModel), with factors shared by every target")

    # -- forward and switching -------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.aurora.forward_scope():
            return self.model(*args, **kwargs)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        name = _one(adapter_name)
        self.aurora.set_adapter(name)
        _set_adapter(self.model, name, inference_mode=inference_mode)  # PEFT's heads
        if inference_mode:
            self.aurora.active.set_trainable(False)
        self.active_adapter = name

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            self.aurora._adapter(name).set_trainable(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        self.aurora.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        _delete_auxiliary_adapter(self.model, adapter_name, new_active_adapters=[self.aurora.active_adapter])
        self.active_adapter = self.aurora.active_adapter

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        self.aurora.adapter_enabled = enabled
        for module in self.model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                module.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        self._enable_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        self._enable_adapter_layers(False)

    # -- merging and unloading -------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.aurora.merge(_one(adapter_names) if adapter_names else None)

    def unmerge_adapter(self) -> None:
        self.aurora.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        model = self.aurora.merge_and_unload(_one(adapter_names) if adapter_names else None)
        return self._without_peft(model)

    def unload(self) -> nn.Module:
        return self._without_peft(self.aurora.unload())

    def _without_peft(self, model: nn.Module) -> nn.Module:
        """PEFT's head wrappers replaced by the active adapter's heads, and PEFT's config attribute removed."""
        for name, module in list(model.named_modules()):
            if isinstance(module, AuxiliaryTrainingWrapper):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child,
                        module.modules_to_save[self.aurora.active_adapter]
                        if self.aurora.active_adapter in module.modules_to_save else module.original_module)
        if hasattr(model, "peft_config"):
            del model.peft_config
        return model

    # -- state dicts (PEFT's save_pretrained / load_adapter) --------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: Any, adapter_name: str,
                                state_dict: dict[str, torch.Tensor], unwanted_adapter_names: list[str]
                                ) -> dict[str, torch.Tensor]:
        marker = f"{_ADAPTERS}.{adapter_name}."
        return {key: value for key, value in state_dict.items() if marker in key}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        marker = f"{_ADAPTERS}.{adapter_name}."
        if marker in key:
            return key.replace(marker, f"{_ADAPTERS}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: Any, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        saved, named = f"{_ADAPTERS}.", f"{_ADAPTERS}.{adapter_name}."
        return {key.replace(saved, named, 1) if saved in key and named not in key else key: value
                for key, value in state_dict.items()}


def _one(adapter_names: str | list[str]) -> str:
    """Aurora runs one adapter at a time (its factor set); PEFT may pass a list of one."""
    if isinstance(adapter_names, str):
        return adapter_names
    if len(adapter_names) != 1:
        raise ValueError(f"Aurora activates or merges one adapter at a time, got {list(adapter_names)}")
    return adapter_names[0]


def export_to_peft(path: str | Path, destination: str | Path) -> Path:
    """An adapter saved by `AuroraModel.save_pretrained`, rewritten in PEFT's layout for
    `PeftModel.from_pretrained`.

    PEFT cannot read aurora-pet's own files: it looks the heads up under its own key names
    (`base_model.model.<head>.…`) before any method's code runs, and its config needs `peft_type`. The
    source is read with every check (checksum, config); the momentum factors, which PEFT models never have,
    are left out.

    Parameters
    ----------
    path : str or Path
        The aurora-pet adapter directory.
    destination : str or Path
        Where to write `adapter_config.json` and `adapter_model.safetensors` (created if missing).

    Returns
    -------
    Path
        `destination`.
    """
    from safetensors.torch import save_file

    saved = adapter_files.read_adapter(path)
    tensors = {adapter_files.peft_key(k): v.contiguous() for k, v in saved.tensors.items()
               if not k.startswith("factors_m.")}
    config = AuroraPeftConfig(**saved.config.to_dict())
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    with atomic_files([destination / adapter_files.WEIGHTS_NAME, destination / adapter_files.CONFIG_NAME]) as (
            weights, config_file):
        save_file(tensors, str(weights), metadata={"format": "pt"})
        config_file.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return destination


register_peft_method(name=NAME, config_cls=AuroraPeftConfig, model_cls=AuroraTuner, prefix=PREFIX)

__all__ = ["AURORA", "AuroraPeftConfig", "AuroraTuner", "export_to_peft"]
