"""`AuroraModel`: finds the targets, injects the shared factors and fusion sites, merges, saves, loads.

The base model stays untouched in structure: its modules keep their classes and every parameter keeps
its name, so `model.base_model.state_dict()` has the same keys before and after wrapping. The adapters'
own parameters live beside it, in this wrapper (`aurora_adapters.<name>`), never inside base modules:
LAVIS's momentum update zips the parameters of paired modules by position, and extra parameters inside
them would break that pairing.

Named adapters follow PEFT: the first is "default"; `add_adapter`, `set_adapter`, `delete_adapter` and
`load_adapter(path, adapter_name=...)` manage more, each with its own factor set, and only the active one
acts. The one-adapter API (`aurora_config`, `aurora_factors`, `layers`, ...) reads the active adapter.

What is specific to a model family (presets, where a fusion site reads the text mask, momentum pairs,
patches of third-party behaviour) comes from `aurora_pet.families`; this module names no family.
"""

from __future__ import annotations

import collections
import contextlib
import difflib
import inspect
import types
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import adapter_files
from .adapter import Adapter
from .config import AuroraConfig
from .errors import MergeError, TargetError
from .factors import ModeFactors
from .families import FusionInputs, family_of
from .layer import AuroraLinear, TargetDispatch
from .targets import (find_fusion_sites, find_modules_to_save, find_targets, has_prefix, infer_slice_size,
                      resolve_targets, site_key, width_classes)

DEFAULT_ADAPTER = "default"


class AuroraModel(nn.Module):
    """A base model with mode-approximation adapters; calls and attributes pass through to the base."""

    def __init__(self, model: nn.Module, config: AuroraConfig,
                 momentum_pairs: Sequence[tuple[str, str]] | None = None, momentum: float | None = None,
                 adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        if isinstance(model, AuroraModel):
            raise TypeError("the model is already an AuroraModel")
        self.base_model = model
        self.family = family_of(model)
        if momentum_pairs is None:
            momentum_pairs = self.family.momentum_pairs(model) if self.family else []
        if momentum is None:
            momentum = self.family.momentum(model) if self.family else 0.995
        self.momentum, self.momentum_pairs = momentum, [tuple(pair) for pair in momentum_pairs]
        self.aurora_adapters = nn.ModuleDict()
        self.active_adapter = adapter_name
        self.merged_adapter: str | None = None
        self.adapter_enabled = True
        # z = x·V shared by targets that read the same tensor (see AuroraLinear.shared_input_projection);
        # a switch so that tests and benchmarks can compare with the per-target computation
        self.share_input_projections = True
        self._input_projections: collections.OrderedDict[tuple[int, int, int], Any] = collections.OrderedDict()
        self._factors_in_use: dict[str, ModeFactors] = {}  # adapter name → the factors `use_factors` swapped in
        self._dispatch: dict[str, TargetDispatch] = {}
        self._hooks: dict[str, list[Any]] = {}
        self._fusion_masks: dict[tuple[str, str], Any] = {}
        self._base_heads: dict[str, torch.Tensor] = {}  # heads' weights as the base model had them
        self._undo: list[Any] = []
        self._base_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self.forward = _forward_with_signature_of(model, self)
        self.register_state_dict_post_hook(_adapter_only_state)
        self.register_load_state_dict_post_hook(_base_keys_not_missing)
        try:
            self._add(adapter_name, config)
            self._patch()
            self._set_trainable()
        except BaseException:
            self._rollback()
            raise

    # -- the active adapter (the one-adapter API) ------------------------------------------------
    @property
    def active(self) -> Adapter:
        return self.aurora_adapters[self.active_adapter]

    @property
    def active_adapters(self) -> list[str]:
        """PEFT's name: the adapters that act in forward (one at a time here)."""
        return [self.active_adapter]

    @property
    def peft_config(self) -> dict[str, AuroraConfig]:
        """Each adapter's config by name (PEFT's name)."""
        return {name: adapter.config for name, adapter in self.aurora_adapters.items()}

    @property
    def aurora_config(self) -> AuroraConfig:
        return self.active.config

    @property
    def aurora_factors(self) -> ModeFactors:
        return self.active.factors

    @property
    def aurora_factors_m(self) -> ModeFactors | None:
        return self.active.factors_m

    @property
    def aurora_fusion(self) -> nn.ModuleDict:
        return self.active.fusion

    @property
    def aurora_dropout(self) -> nn.Dropout:
        return self.active.dropout

    @property
    def layers(self) -> dict[str, AuroraLinear]:
        return self.active.layers

    @property
    def momentum_layers(self) -> dict[str, AuroraLinear]:
        return self.active.momentum_layers

    @property
    def fusion_sites(self) -> list[str]:
        return self.active.fusion_sites

    @property
    def heads(self) -> dict[str, nn.Module]:
        return self.active.heads

    @property
    def slice_size(self) -> int:
        return self.active.slice_size

    @property
    def num_slices(self) -> int:
        return self.active.factors.num_slices

    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    @property
    def adapter_active(self) -> bool:
        """Whether the unmerged update is added in forward (off when disabled or already merged)."""
        return self.adapter_enabled and not self.merged

    def all_layers(self) -> list[AuroraLinear]:
        """The active adapter's online targets, then their momentum copies."""
        return self.active.all_layers()

    # -- building and installing an adapter --------------------------------------------------------
    def _add(self, name: str, config: AuroraConfig) -> Adapter:
        """Build adapter `name` for `config` and install it; a failure leaves no trace of it."""
        _check_adapter_name(name, self.aurora_adapters)
        adapter = self._build(name, config)
        self.aurora_adapters[name] = adapter
        try:
            self._install(adapter)
        except BaseException:
            self._uninstall(adapter)
            del self.aurora_adapters[name]
            raise
        return adapter

    def _build(self, name: str, config: AuroraConfig) -> Adapter:
        config.validate()
        model = self.base_model
        plan = resolve_targets(model, config, self.family)
        targets = find_targets(model, plan.target_modules, exclude=[tracking for _, tracking in self.momentum_pairs])
        d = infer_slice_size(targets, config)
        layers: dict[str, AuroraLinear] = {}
        first = 0
        for target, module in targets:
            layers[target] = AuroraLinear(target, module, first, d, None, self)  # adapter: set below
            first += layers[target].num_slices
        out_widths, in_widths = width_classes(layers.values(), config.rank)
        factors = ModeFactors(d, first, config.rank, config.core, config.init_seed, out_widths, in_widths)
        heads = find_modules_to_save(model, plan.modules_to_save)
        adapter = Adapter(name, config, d, layers, factors, find_fusion_sites(model, config, plan.fusion_modules),
                          heads)
        for layer in layers.values():
            layer.adapter = adapter
        self._add_momentum_layers(adapter)
        device = next((p.device for p in model.parameters()), None)
        if device is not None:  # the adapter lives where the model does, in float32 (docs/method.md, "Precision")
            adapter.to(device)
        for head, module in heads.items():  # what a new adapter's heads start from
            for key, value in module.state_dict().items():
                self._base_heads.setdefault(f"{head}.{key}", value.detach().clone())
        if name != self.active_adapter:
            adapter.head_state = self._base_head_state(adapter)
        return adapter

    def _add_momentum_layers(self, adapter: Adapter) -> None:
        """Adapt the momentum copy of each target with an EMA copy of the factors (no gradient)."""
        modules = dict(self.base_model.named_modules())
        for online, tracking in self.momentum_pairs:
            for name, layer in adapter.layers.items():
                if has_prefix(name, online):
                    twin = tracking + name[len(online):]
                    if not isinstance(modules.get(twin), nn.Linear) or modules[twin].weight.shape != layer.module.weight.shape:
                        raise TargetError(f"momentum copy {twin!r} of target {name!r} is missing or has another shape")
                    adapter.momentum_layers[twin] = AuroraLinear(twin, modules[twin], layer.first_slice,
                                                                 adapter.slice_size, adapter, self, momentum=True)
        if adapter.momentum_layers:
            adapter.add_momentum_factors()

    @torch.no_grad()
    def momentum_update(self) -> None:
        """factors_m ← m·factors_m + (1 − m)·factors of the active adapter (the one that trains), as BLIP
        does for its momentum encoders."""
        adapter = self.active
        if adapter.factors_m is not None:
            for tracked, online in zip(adapter.factors_m.parameters(), adapter.factors.parameters()):
                tracked.mul_(self.momentum).add_(online, alpha=1.0 - self.momentum)

    def _install(self, adapter: Adapter) -> None:
        name = adapter.adapter_name
        for layer in adapter.all_layers():
            dispatch = self._dispatch.get(layer.name)
            if dispatch is None:
                dispatch = TargetDispatch(layer.name, layer.module, self)
                dispatch.install()
                self._dispatch[layer.name] = dispatch
            dispatch.layers[name] = layer
        modules = dict(self.base_model.named_modules())
        hooks = self._hooks.setdefault(name, [])
        for site in adapter.fusion_sites:
            inputs = self.family.fusion_inputs(self.base_model, site) if self.family else FusionInputs(site)
            if inputs.mask_module not in modules:
                raise TargetError(f"fusion site {site!r} reads its text mask from {inputs.mask_module!r}, "
                                  "which the model does not have")
            hooks.append(modules[inputs.mask_module].register_forward_pre_hook(
                self._mask_hook(name, site, inputs), with_kwargs=True))
            hooks.append(modules[site].register_forward_hook(self._fusion_hook(name, site, inputs), with_kwargs=True))

    def _uninstall(self, adapter: Adapter) -> None:
        """Take one adapter's layers and hooks out (the modules it alone adapts get their own forward back)."""
        name = adapter.adapter_name
        for layer in adapter.all_layers():
            dispatch = self._dispatch.get(layer.name)
            if dispatch is not None and dispatch.layers.get(name) is layer:
                del dispatch.layers[name]
                if not dispatch.layers:
                    dispatch.remove()
                    del self._dispatch[layer.name]
        for handle in self._hooks.pop(name, []):
            handle.remove()
        for key in [key for key in self._fusion_masks if key[0] == name]:
            del self._fusion_masks[key]

    def _patch(self) -> None:
        """The family's patches for the adapters there are now (re-applied when adapters come or go)."""
        self._unpatch()
        if self.family is not None:
            self._undo = self.family.patch(self.base_model, self)

    def _unpatch(self) -> None:
        while self._undo:  # third-party patches, last applied first undone
            self._undo.pop()()

    def ice_sites(self) -> list[str]:
        """The fusion sites where some adapter runs ICE (families switch the decoder's cache off there)."""
        return sorted({site for a in self.aurora_adapters.values() if a.config.ice for site in a.fusion_sites})

    def _mask_hook(self, adapter: str, site: str, inputs: FusionInputs):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.active_adapter == adapter:
                self._fusion_masks[adapter, site] = inputs.read_mask(args, kwargs)

        return hook

    def _fusion_hook(self, adapter: str, site: str, inputs: FusionInputs):
        key = site_key(site)

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            mask = self._fusion_masks.pop((adapter, site), None)
            if not self.adapter_enabled or self.active_adapter != adapter:
                return output
            text = inputs.read_text(args, kwargs)
            fusion = self.aurora_adapters[adapter].fusion[key]
            if isinstance(output, torch.Tensor):
                return fusion(output, text, mask)
            return (fusion(output[0], text, mask),) + tuple(output[1:])

        return hook

    def _remove(self) -> None:
        for adapter in self.aurora_adapters.values():
            self._uninstall(adapter)
        self._fusion_masks.clear()
        self._unpatch()

    def _rollback(self) -> None:
        """Undo the wrapping completely (hooks, forwards, patches and the base's requires_grad flags), for a
        construction or `from_pretrained` that failed: the caller's model is left as it was given."""
        self._remove()
        for name, parameter in self.base_model.named_parameters():
            parameter.requires_grad_(self._base_requires_grad[name])

    # -- named adapters (PEFT's names) -------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: AuroraConfig) -> None:
        """A new adapter with its own factor set, fusion sites and heads, on the same base model. It does
        not become active (PEFT's convention): `set_adapter(adapter_name)` to train or use it."""
        self._add(adapter_name, config)
        self._patch()
        self._set_trainable()

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the adapter that acts in forward and trains (the others are frozen). Its task
        heads' weights are swapped into the base model; the previous adapter's are kept for it."""
        self._adapter(adapter_name)
        if adapter_name == self.active_adapter:
            return
        if self.merged:
            warnings.warn(f"adapter {self.merged_adapter!r} is merged; unmerging it before switching to "
                          f"{adapter_name!r}", UserWarning, stacklevel=2)
            self.unmerge()
        previous = self.active
        previous.head_state = {k: v.detach().clone() for k, v in previous.head_tensors().items()}
        self._copy_heads(self._base_head_state(previous))
        new = self.aurora_adapters[adapter_name]
        self._copy_heads(new.head_tensors(), new)
        new.head_state = None
        self.active_adapter = adapter_name
        self._input_projections.clear()
        self._set_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter. Deleting the active one activates the first remaining adapter; the last one is
        not deleted (`unload()` gives the base model back)."""
        adapter = self._adapter(adapter_name)
        if len(self.aurora_adapters) == 1:
            raise ValueError(f"{adapter_name!r} is the only adapter; use unload() to get the base model back")
        if self.merged_adapter == adapter_name:
            raise MergeError(f"adapter {adapter_name!r} is merged; call unmerge() before deleting it")
        if adapter_name == self.active_adapter:
            self.set_adapter(next(n for n in self.aurora_adapters if n != adapter_name))
        self._uninstall(adapter)
        del self.aurora_adapters[adapter_name]
        self._patch()

    def _adapter(self, name: str) -> Adapter:
        if name not in self.aurora_adapters:
            close = difflib.get_close_matches(str(name), list(self.aurora_adapters), 3)
            raise KeyError(f"no adapter named {name!r}; adapters: {list(self.aurora_adapters)}"
                           + (f"; did you mean {close}?" if close else ""))
        return self.aurora_adapters[name]

    def _base_head_state(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        """A copy of the base model's own weights for `adapter`'s heads."""
        return {key: self._base_heads[key].clone() for key in adapter.head_tensors()}

    def _copy_heads(self, state: dict[str, torch.Tensor], adapter: Adapter | None = None) -> None:
        """Copy `<head>.<tensor>` weights into the live head modules (of `adapter`, default the active one)."""
        heads = (adapter or self.active).heads
        with torch.no_grad():
            for head, module in heads.items():
                own = module.state_dict()
                for key, value in own.items():
                    value.copy_(state[f"{head}.{key}"])

    def _set_trainable(self) -> None:
        """The active adapter's factors, ICE/GQT and heads train; the base and the other adapters do not."""
        for parameter in self.base_model.parameters():
            parameter.requires_grad_(False)
        for name, adapter in self.aurora_adapters.items():
            adapter.set_trainable(name == self.active_adapter)
        for module in self.heads.values():
            module.requires_grad_(True)

    # -- pass-through ----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.forward_scope():
            return self.base_model(*args, **kwargs)

    @contextlib.contextmanager
    def forward_scope(self) -> Iterator[None]:
        """One forward pass: what the adapter caches within a pass (shared input projections) is dropped at
        its end. `forward` uses it; code that runs a pass by calling the base model's submodules directly
        (a loss or an evaluator over `vision_model`, `text_encoder`, ...) wraps the pass in it."""
        try:
            yield
        finally:
            self._input_projections.clear()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """The base model's activation checkpointing (transformers' method), non-reentrant unless
        `use_reentrant=True` is asked for. The reentrant form gives no gradient to adapter parameters inside
        a checkpointed block whose input does not require grad — with the base frozen, none does — so it is
        used only with the base's input embeddings made to require grad. Shared input projections are off
        while checkpointing: a recomputed block must save exactly what its first pass saved."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if not hasattr(self.base_model, "gradient_checkpointing_enable"):
            raise AttributeError(f"{type(self.base_model).__name__} has no gradient_checkpointing_enable(); "
                                 "wrap its blocks in torch.utils.checkpoint yourself")
        if kwargs["use_reentrant"]:
            self.base_model.enable_input_require_grads()
        self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.share_input_projections = False

    def gradient_checkpointing_disable(self) -> None:
        self.base_model.gradient_checkpointing_disable()
        self.share_input_projections = True

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            if name in _BASE_ADAPTER_API:
                raise AttributeError(
                    f"AuroraModel has no {name}(): the base model's own {name} belongs to transformers' PEFT "
                    "integration, which knows nothing of Aurora's adapters; use disable_adapter() (a context "
                    "manager), adapter_state_dict() and add_adapter / set_adapter / delete_adapter") from None
            return getattr(self.base_model, name)

    # -- the update ------------------------------------------------------------------------------
    def delta_weight(self, name: str, adapter_name: str | None = None) -> torch.Tensor:
        """s·ΔW of one target module (all its slices) of an adapter (the active one), shape (d_out, d_in)."""
        adapter = self._adapter(adapter_name or self.active_adapter)
        layers = {layer.name: layer for layer in adapter.all_layers()}
        if name not in layers:
            close = difflib.get_close_matches(name, layers, 3)
            raise KeyError(f"{name!r} is not an adapted module" + (f"; did you mean {close}?" if close else ""))
        return layers[name].delta_weight()

    get_delta_weight = delta_weight

    def merge(self, adapter_name: str | None = None) -> None:
        """W ← W + s·ΔW for every target of an adapter (TensorLy reconstruction); forward then adds nothing.
        A named adapter other than the active one is activated first."""
        if self.merged:
            raise MergeError(f"adapter {self.merged_adapter!r} is already merged; call unmerge() before merging "
                             "again")
        if adapter_name is not None:
            self.set_adapter(adapter_name)
        self._fold(1.0)
        self.merged_adapter = self.active_adapter

    def unmerge(self) -> None:
        """W ← W − s·ΔW: the base weights again, up to the rounding of one add and one subtract."""
        if not self.merged:
            raise MergeError("the adapter is not merged; nothing to unmerge")
        self._fold(-1.0)
        self.merged_adapter = None

    @torch.no_grad()
    @contextlib.contextmanager
    def temporarily_merged(self) -> Iterator[None]:
        """The update folded into the weights for the block — inference at the base model's speed, ICE/GQT
        still running — then the exact weights back: the targets' weights are copied before merging and
        copied back after, not recomputed by a subtraction, so training goes on bit for bit. A model that is
        already merged stays as it is."""
        if self.merged:
            yield
            return
        saved = [(layer.module.weight, layer.module.weight.detach().clone()) for layer in self.all_layers()]
        self.merge()
        try:
            yield
        finally:
            with torch.no_grad():
                for weight, original in saved:
                    weight.copy_(original)
            self.merged_adapter = None

    def _fold(self, sign: float) -> None:
        """W ← W ± s·ΔW, summed in the factors' float32 (or W's dtype if wider) and rounded once to W's
        dtype, so a half-precision weight is rounded once, not once for ΔW and again for the sum."""
        with torch.no_grad():  # a weight update, not part of any graph (the weights stay frozen leaves)
            for layer in self.all_layers():
                weight = layer.module.weight
                weight.copy_(weight + sign * layer.reference_delta_weight())

    def merge_and_unload(self, adapter_name: str | None = None) -> nn.Module:
        """The plain base model (same classes and parameter names) with one adapter's update (the active
        one's) in its weights."""
        adapter = self._adapter(adapter_name or self.merged_adapter or self.active_adapter)
        if adapter.fusion_sites:
            raise MergeError(
                f"ICE/GQT at {len(adapter.fusion_sites)} cross-attention sites are not weight updates and cannot "
                "be merged into a plain model; use merge() to fold the factors in and keep ICE/GQT running, "
                "or train with ice=False, gqt=False")
        if self.merged_adapter != adapter.adapter_name:
            if self.merged:
                self.unmerge()
            self.merge(adapter.adapter_name)
        return self.unload()

    def unload(self) -> nn.Module:
        """The base model with every adapter hook removed (weights as they are now)."""
        self._remove()
        return self.base_model

    @contextlib.contextmanager
    def use_factors(self, factors: ModeFactors) -> Iterator[None]:
        """Inside the block the active adapter's online targets compute their update from `factors` instead
        of the adapter's own: a factor set of the same layout that someone else keeps, e.g. the EMA copy a
        retrieval loss holds for momentum distillation. The same frozen base then runs as the momentum
        model, without a copy of it. ICE/GQT and the heads are not swapped (a caller that keeps momentum
        copies of the heads calls those itself); the targets' momentum copies keep reading `factors_m`.

        Parameters
        ----------
        factors : ModeFactors
            Same class and the same tensor names and shapes as the active adapter's `factors`.

        Raises
        ------
        ValueError
            When `factors` does not have the adapter's layout.
        MergeError
            When an adapter is merged: the forward would add no update, so the swap would not act.
        """
        adapter = self.active
        own = {k: tuple(v.shape) for k, v in adapter.factors.state_dict().items()}
        other = {k: tuple(v.shape) for k, v in factors.state_dict().items()} if isinstance(factors, nn.Module) else None
        if type(factors) is not type(adapter.factors) or other != own:
            raise ValueError(f"use_factors needs a {type(adapter.factors).__name__} with the layout of adapter "
                             f"{adapter.adapter_name!r} ({own}), got {type(factors).__name__}"
                             + (f" ({other})" if other is not None else ""))
        if self.merged:
            raise MergeError(f"adapter {self.merged_adapter!r} is merged: its forward adds no update, so other "
                             "factors cannot act; unmerge() first")
        name = adapter.adapter_name
        previous = self._factors_in_use.get(name)
        self._factors_in_use[name] = factors
        try:
            yield
        finally:
            if previous is None:
                del self._factors_in_use[name]
            else:
                self._factors_in_use[name] = previous

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Base-model behaviour inside the block: no factor update, no ICE/GQT (heads stay trained)."""
        was_merged = self.merged
        if was_merged:
            self.unmerge()
        self.adapter_enabled = False
        try:
            yield
        finally:
            self.adapter_enabled = True
            if was_merged:
                self.merge()

    # -- reporting -------------------------------------------------------------------------------
    def parameter_report(self, base_exclude: Sequence[str] | None = None) -> dict[str, Any]:
        """Trainable parameters per group of the active adapter against the base model; the base count
        leaves out the momentum copies unless `base_exclude` (module-name prefixes) says otherwise."""
        from .report import parameter_report

        if base_exclude is None:
            base_exclude = [tracking for _, tracking in self.momentum_pairs]
        return parameter_report(self, base_exclude)

    def print_trainable_parameters(self, base_exclude: Sequence[str] | None = None) -> None:
        from .report import format_report

        print(format_report(self.parameter_report(base_exclude)))

    def layout(self, adapter_name: str | None = None) -> dict[str, Any]:
        """What an adapter file must agree with: d, the targets and their slices, the fusion sites."""
        return self._adapter(adapter_name or self.active_adapter).layout()

    # -- persistence -----------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Only what training changed, of one adapter (the active one): factors, ICE/GQT, and the heads in
        `modules_to_save`."""
        return self._adapter(adapter_name or self.active_adapter).state()

    def save_pretrained(self, path: str | Path, *, momentum: bool = True, dtype: torch.dtype | None = None,
                        selected_adapters: Sequence[str] | None = None, is_main_process: bool = True,
                        safe_serialization: bool = True, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write adapter_config.json and adapter_model.safetensors (adapter only) into `path`; with several
        adapters (PEFT's layout), "default" there and each other adapter in `path/<name>`.

        For an inference export: `momentum=False` leaves out the momentum factors (`factors_m`, only
        training uses them; loading starts them as a copy of the factors, as wrapping does), and
        `dtype=torch.float16` / `torch.bfloat16` stores every tensor in half precision (loading casts back to
        the adapter's float32). `selected_adapters` saves only those. What frameworks pass is accepted:
        `is_main_process=False` writes nothing (other ranks of a distributed run); the files are always
        safetensors; a `state_dict` is not needed (the adapter's tensors are read from the model)."""
        if not safe_serialization:
            raise ValueError("adapter files are always written as safetensors; safe_serialization=False is not "
                             "supported")
        del state_dict  # the adapter's own tensors are what is written
        names = list(self.aurora_adapters) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._adapter(name)
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        path = Path(path)
        if not is_main_process:
            return path
        for name in names:
            adapter = self.aurora_adapters[name]
            state = adapter.state()
            if not momentum:
                state = {k: v for k, v in state.items() if not k.startswith("factors_m.")}
            if dtype is not None:
                state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
            omitted = not momentum and adapter.factors_m is not None
            adapter_files.save_adapter(path if name == DEFAULT_ADAPTER else path / name, adapter.config, state,
                                       adapter.layout(), momentum_omitted=omitted)
        return path

    def load_adapter(self, path: str | Path, adapter_name: str | None = None, is_trainable: bool = True) -> None:
        """Load adapter weights saved by `save_pretrained`; everything is checked before anything is copied.

        `adapter_name`: None loads into the active adapter; an existing name into that adapter; a new name
        adds an adapter with the file's config first (PEFT's `load_adapter`), which does not become active.
        `is_trainable=False` freezes the loaded adapter (inference). A merged model stays merged, now with
        the loaded update (see `_load`)."""
        saved = adapter_files.read_adapter(path)
        name = adapter_name or self.active_adapter
        if name in self.aurora_adapters:
            self._load(saved, name)
        else:
            self._add(name, saved.config)
            try:
                self._load(saved, name)
            except BaseException:
                self._uninstall(self.aurora_adapters[name])
                del self.aurora_adapters[name]
                raise
            self._patch()
        self._set_trainable()
        if not is_trainable:
            self.aurora_adapters[name].set_trainable(False)

    def _load(self, saved: adapter_files.SavedAdapter, name: str) -> None:
        """Check `saved` against adapter `name`, then copy it in. Merged, the old update is folded into the
        base weights: it is taken out (unmerge) before the factors change and the new one folded in after,
        else a later unmerge would subtract the new update from weights that hold the old one."""
        adapter = self.aurora_adapters[name]
        expected = adapter.state()
        adapter_files.check_fits(saved, adapter.config, adapter.layout(), expected)
        was_merged = self.merged_adapter == name
        if was_merged:
            self.unmerge()
        with torch.no_grad():
            for key, target in expected.items():
                if key in saved.tensors:
                    target.copy_(saved.tensors[key])
            if saved.momentum_omitted and adapter.factors_m is not None:
                adapter.factors_m.load_state_dict(adapter.factors.state_dict())
        if was_merged:
            self.merge()

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | Path, adapter_name: str = DEFAULT_ADAPTER,
                        is_trainable: bool = True, **kwargs: Any) -> "AuroraModel":
        """Wrap `model` as the adapter in `path` says and load its weights (kwargs as for the constructor).

        The files are read and checked (config, checksum) before `model` is touched; an adapter that then
        does not fit the wrapped model undoes the wrapping, so a failed call leaves `model` as it was.
        `is_trainable=False` freezes the adapter (inference)."""
        saved = adapter_files.read_adapter(path)
        aurora = cls(model, saved.config, adapter_name=adapter_name, **kwargs)
        try:
            aurora._load(saved, adapter_name)
        except BaseException:
            aurora._rollback()
            raise
        if not is_trainable:
            aurora.active.set_trainable(False)
        return aurora


# transformers' PEFT-integration methods on a base model that AuroraModel does not define: passed through,
# they would act on another kind of adapter
_BASE_ADAPTER_API = frozenset({"disable_adapters", "enable_adapters", "get_adapter_state_dict"})


def _forward_with_signature_of(model: nn.Module, aurora: "AuroraModel") -> Any:
    """`AuroraModel.forward` bound to `aurora`, showing `model.forward`'s signature: tools that pick inputs by
    it (`transformers.Trainer` keeps only the dataset columns the forward names) see the base model's
    parameters instead of `*args, **kwargs`. A function object of its own per instance carries that
    signature; `deepcopy` rebinds the method to the copy."""
    function = types.FunctionType(AuroraModel.forward.__code__, AuroraModel.forward.__globals__, "forward",
                                  closure=AuroraModel.forward.__closure__)
    function.__qualname__ = AuroraModel.forward.__qualname__
    function.__doc__ = model.forward.__doc__
    try:
        base = inspect.signature(model.forward)
        self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        function.__signature__ = base.replace(parameters=[self_parameter, *base.parameters.values()])
    except (TypeError, ValueError):  # a forward without an inspectable signature keeps ours
        pass
    return types.MethodType(function, aurora)


def get_aurora_model(model: nn.Module, config: AuroraConfig, **kwargs: Any) -> AuroraModel:
    """Wrap `model`: freeze it, inject the shared factors (and ICE/GQT), train heads in `modules_to_save`.

    Keyword arguments go to `AuroraModel` (`momentum_pairs`, `momentum`, `adapter_name`: "default")."""
    return AuroraModel(model, config, **kwargs)


def _check_adapter_name(name: Any, existing: nn.ModuleDict) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"an adapter name must be a non-empty string without '.', got {name!r}")
    if name in existing:
        raise ValueError(f"an adapter named {name!r} already exists; delete_adapter({name!r}) first or choose "
                         "another name")


def _frozen_base_keys(aurora: AuroraModel) -> set[str]:
    """State-dict keys of the base model that training does not change (all but the trainable heads)."""
    trainable = {n for n, p in aurora.base_model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {f"base_model.{k}" for k in aurora.base_model.state_dict(keep_vars=True) if k not in trainable}


def _adapter_only_state(aurora: AuroraModel, state: dict[str, Any], prefix: str, metadata: Any) -> None:
    """`AuroraModel.state_dict()` holds what training changes — every adapter's parameters and the trainable
    heads — not the frozen base weights, which come from the base model's own checkpoint: checkpoints that
    frameworks write from `state_dict()` (transformers' Trainer, accelerate, Lightning) are adapter-sized.
    `base_model.state_dict()` is the base model's."""
    for key in _frozen_base_keys(aurora):
        state.pop(prefix + key, None)


def _base_keys_not_missing(aurora: AuroraModel, incompatible: Any) -> None:
    """`load_state_dict` of what `state_dict()` gave (no frozen base weights) is complete, strict or not."""
    frozen = _frozen_base_keys(aurora)

    def is_frozen(key: str) -> bool:  # the key itself or any dotted tail of it (a nested AuroraModel's)
        parts = key.split(".")
        return any(".".join(parts[i:]) in frozen for i in range(len(parts)))

    incompatible.missing_keys[:] = [key for key in incompatible.missing_keys if not is_frozen(key)]
