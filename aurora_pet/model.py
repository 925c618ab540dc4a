"""`AuroraModel`: finds the targets, injects the shared factors and fusion sites, merges, saves, loads.

The base model stays untouched in structure: its modules keep their classes and every parameter keeps
its name, so `model.base_model.state_dict()` has the same keys before and after wrapping. The adapter's
own parameters live beside it, in this wrapper (`aurora_factors`, `aurora_fusion`), never inside base
modules: LAVIS's momentum update zips the parameters of paired modules by position, and extra
parameters inside them would break that pairing.

What is specific to a model family (presets, where a fusion site reads the text mask, momentum pairs,
patches of third-party behaviour) comes from `aurora_pet.families`; this module names no family.
"""

from __future__ import annotations

import collections
import contextlib
import difflib
import copy
import inspect
import re
import types
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from . import adapter_files
from .config import AuroraConfig
from .errors import AuroraConfigError, MergeError, TargetError
from .factors import ModeFactors
from .families import FAMILY_NAMES, Family, FusionInputs, Preset, all_presets, family_of, get_family
from .fusion import FusionSite
from .layer import AuroraLinear


class AuroraModel(nn.Module):
    """A base model with a mode-approximation adapter; calls and attributes pass through to the base."""

    def __init__(self, model: nn.Module, config: AuroraConfig,
                 momentum_pairs: Sequence[tuple[str, str]] | None = None, momentum: float | None = None) -> None:
        super().__init__()
        if isinstance(model, AuroraModel):
            raise TypeError("the model is already an AuroraModel")
        config.validate()
        self.base_model = model
        self.aurora_config = config
        self.family = family_of(model)
        self.adapter_enabled = True
        self.merged = False
        plan = resolve_targets(model, config, self.family)
        if momentum_pairs is None:
            momentum_pairs = self.family.momentum_pairs(model) if self.family else []
        if momentum is None:
            momentum = self.family.momentum(model) if self.family else 0.995
        targets = find_targets(model, plan.target_modules, exclude=[tracking for _, tracking in momentum_pairs])
        self.slice_size = infer_slice_size(targets, config)
        self.layers: dict[str, AuroraLinear] = {}
        first = 0
        for name, module in targets:
            self.layers[name] = AuroraLinear(name, module, first, self.slice_size, self)
            first += self.layers[name].num_slices
        out_widths, in_widths = width_classes(self.layers.values(), config.rank)
        self.aurora_factors = ModeFactors(self.slice_size, first, config.rank, config.core, config.init_seed,
                                          out_widths, in_widths)
        self.momentum, self.momentum_pairs = momentum, [tuple(pair) for pair in momentum_pairs]
        self._add_momentum_layers(model, momentum_pairs)
        self.aurora_dropout = nn.Dropout(config.dropout)
        self.fusion_sites = find_fusion_sites(model, config, plan.fusion_modules)
        self.aurora_fusion = nn.ModuleDict({
            _site_key(name): FusionSite(self.slice_size, config.ice, config.gqt) for name in self.fusion_sites})
        self.heads = find_modules_to_save(model, plan.modules_to_save)
        device = next((p.device for p in model.parameters()), None)
        if device is not None:  # the adapter lives where the model does, in float32 (docs/method.md, "Precision")
            for name, module in self.named_children():
                if name != "base_model":
                    module.to(device)
        self._hooks: list[Any] = []
        self._fusion_masks: dict[str, Any] = {}
        # z = x·V shared by targets that read the same tensor (see AuroraLinear.shared_input_projection);
        # a switch so that tests and benchmarks can compare with the per-target computation
        self.share_input_projections = True
        self._input_projections: collections.OrderedDict[tuple[str, int, int], Any] = collections.OrderedDict()
        self._undo: list[Any] = []
        self._base_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self.forward = _forward_with_signature_of(model, self)
        self._freeze_base()
        try:
            self._install()
        except BaseException:
            self._rollback()
            raise

    # -- structure -------------------------------------------------------------------------------
    @property
    def adapter_active(self) -> bool:
        """Whether the unmerged update is added in forward (off when disabled or already merged)."""
        return self.adapter_enabled and not self.merged

    @property
    def num_slices(self) -> int:
        return self.aurora_factors.num_slices

    def _add_momentum_layers(self, model: nn.Module, pairs: Sequence[tuple[str, str]]) -> None:
        """Adapt the momentum copy of each target with an EMA copy of the factors (no gradient)."""
        modules = dict(model.named_modules())
        self.momentum_layers: dict[str, AuroraLinear] = {}
        for online, tracking in pairs:
            for name, layer in self.layers.items():
                if _has_prefix(name, online):
                    twin = tracking + name[len(online):]
                    if not isinstance(modules.get(twin), nn.Linear) or modules[twin].weight.shape != layer.module.weight.shape:
                        raise TargetError(f"momentum copy {twin!r} of target {name!r} is missing or has another shape")
                    self.momentum_layers[twin] = AuroraLinear(twin, modules[twin], layer.first_slice, self.slice_size,
                                                              self, factors_name="aurora_factors_m")
        if self.momentum_layers:
            self.aurora_factors_m = copy.deepcopy(self.aurora_factors).requires_grad_(False)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """factors_m ← m·factors_m + (1 − m)·factors, as BLIP does for its momentum encoders."""
        if "aurora_factors_m" in self._modules:
            for tracked, online in zip(self.aurora_factors_m.parameters(), self.aurora_factors.parameters()):
                tracked.mul_(self.momentum).add_(online, alpha=1.0 - self.momentum)

    def _freeze_base(self) -> None:
        for parameter in self.base_model.parameters():
            parameter.requires_grad_(False)
        for module in self.heads.values():
            for parameter in module.parameters():
                parameter.requires_grad_(True)

    def all_layers(self) -> list[AuroraLinear]:
        """Online targets, then their momentum copies."""
        return list(self.layers.values()) + list(self.momentum_layers.values())

    def _install(self) -> None:
        for layer in self.all_layers():
            layer.install()
        modules = dict(self.base_model.named_modules())
        for name in self.fusion_sites:
            inputs = self.family.fusion_inputs(self.base_model, name) if self.family else FusionInputs(name)
            if inputs.mask_module not in modules:
                raise TargetError(f"fusion site {name!r} reads its text mask from {inputs.mask_module!r}, "
                                  "which the model does not have")
            self._hooks.append(modules[inputs.mask_module].register_forward_pre_hook(
                self._mask_hook(name, inputs), with_kwargs=True))
            self._hooks.append(modules[name].register_forward_hook(self._fusion_hook(name, inputs), with_kwargs=True))
        if self.family is not None:
            self._undo = self.family.patch(self.base_model, self)

    def _mask_hook(self, name: str, inputs: FusionInputs):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._fusion_masks[name] = inputs.read_mask(args, kwargs)

        return hook

    def _fusion_hook(self, name: str, inputs: FusionInputs):
        site_key = _site_key(name)

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            mask = self._fusion_masks.pop(name, None)
            if not self.adapter_enabled:
                return output
            text = inputs.read_text(args, kwargs)
            site = self.aurora_fusion[site_key]
            if isinstance(output, torch.Tensor):
                return site(output, text, mask)
            return (site(output[0], text, mask),) + tuple(output[1:])

        return hook

    def _remove(self) -> None:
        for layer in self.all_layers():
            layer.remove()
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._fusion_masks.clear()
        while self._undo:  # third-party patches, last applied first undone
            self._undo.pop()()

    def _rollback(self) -> None:
        """Undo the wrapping completely (hooks, forwards, patches and the base's requires_grad flags), for a
        construction or `from_pretrained` that failed: the caller's model is left as it was given."""
        self._remove()
        for name, parameter in self.base_model.named_parameters():
            parameter.requires_grad_(self._base_requires_grad[name])

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

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            if name in _BASE_ADAPTER_API:
                raise AttributeError(
                    f"AuroraModel has no {name}(): it holds one Aurora adapter (named adapters are not supported "
                    f"yet), and the base model's own {name} belongs to transformers' PEFT integration, which "
                    "knows nothing of it; use save_pretrained / load_adapter / disable_adapter()") from None
            return getattr(self.base_model, name)

    # -- the update ------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """s·ΔW of one target module (all its slices), shape (d_out, d_in)."""
        return self._layer(name).delta_weight()

    get_delta_weight = delta_weight

    def _layer(self, name: str) -> AuroraLinear:
        layers = {layer.name: layer for layer in self.all_layers()}
        if name not in layers:
            close = difflib.get_close_matches(name, layers, 3)
            raise KeyError(f"{name!r} is not an adapted module" + (f"; did you mean {close}?" if close else ""))
        return layers[name]

    def merge(self) -> None:
        """W ← W + s·ΔW for every target (TensorLy reconstruction); forward then adds nothing."""
        if self.merged:
            raise MergeError("the adapter is already merged; call unmerge() before merging again")
        self._fold(1.0)
        self.merged = True

    def unmerge(self) -> None:
        """W ← W − s·ΔW: the base weights again, up to the rounding of one add and one subtract."""
        if not self.merged:
            raise MergeError("the adapter is not merged; nothing to unmerge")
        self._fold(-1.0)
        self.merged = False

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
            self.merged = False

    def _fold(self, sign: float) -> None:
        """W ← W ± s·ΔW, summed in the factors' float32 (or W's dtype if wider) and rounded once to W's
        dtype, so a half-precision weight is rounded once, not once for ΔW and again for the sum."""
        with torch.no_grad():  # a weight update, not part of any graph (the weights stay frozen leaves)
            for layer in self.all_layers():
                weight = layer.module.weight
                weight.copy_(weight + sign * layer.reference_delta_weight())

    def merge_and_unload(self) -> nn.Module:
        """The plain base model (same classes and parameter names) with the update in its weights."""
        if self.fusion_sites:
            raise MergeError(
                f"ICE/GQT at {len(self.fusion_sites)} cross-attention sites are not weight updates and cannot "
                "be merged into a plain model; use merge() to fold the factors in and keep ICE/GQT running, "
                "or train with ice=False, gqt=False")
        if not self.merged:
            self.merge()
        return self.unload()

    def unload(self) -> nn.Module:
        """The base model with every adapter hook removed (weights as they are now)."""
        self._remove()
        return self.base_model

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
        """Trainable parameters per group against the base model; the base count leaves out the
        momentum copies unless `base_exclude` (module-name prefixes) says otherwise."""
        from .report import parameter_report

        if base_exclude is None:
            base_exclude = [tracking for _, tracking in self.momentum_pairs]
        return parameter_report(self, base_exclude)

    def print_trainable_parameters(self, base_exclude: Sequence[str] | None = None) -> None:
        from .report import format_report

        print(format_report(self.parameter_report(base_exclude)))

    def layout(self) -> dict[str, Any]:
        """What an adapter file must agree with: d, the targets and their slices, the fusion sites."""
        return {"slice_size": self.slice_size,
                "targets": [[n, l.module.out_features, l.module.in_features, l.first_slice]
                            for n, l in self.layers.items()],
                "fusion_sites": list(self.fusion_sites)}

    # -- persistence -----------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changed: factors, ICE/GQT, and the heads in `modules_to_save`."""
        state = {f"factors.{k}": v for k, v in self.aurora_factors.state_dict().items()}
        if "aurora_factors_m" in self._modules:
            state.update({f"factors_m.{k}": v for k, v in self.aurora_factors_m.state_dict().items()})
        state.update({f"fusion.{k}": v for k, v in self.aurora_fusion.state_dict().items()})
        for head_name, module in self.heads.items():
            state.update({f"heads.{head_name}.{k}": v for k, v in module.state_dict().items()})
        return state

    def save_pretrained(self, path: str | Path, *, momentum: bool = True, dtype: torch.dtype | None = None) -> Path:
        """Write adapter_config.json and adapter_model.safetensors (adapter only) into `path`.

        For an inference export: `momentum=False` leaves out the momentum factors (`factors_m`, only
        training uses them; loading starts them as a copy of the factors, as wrapping does), and
        `dtype=torch.float16` / `torch.bfloat16` stores every tensor in half precision (loading casts back to
        the adapter's float32)."""
        state = self.adapter_state_dict()
        if not momentum:
            state = {k: v for k, v in state.items() if not k.startswith("factors_m.")}
        if dtype is not None:
            if not dtype.is_floating_point:
                raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        omitted = not momentum and "aurora_factors_m" in self._modules
        return adapter_files.save_adapter(path, self.aurora_config, state, self.layout(), momentum_omitted=omitted)

    def load_adapter(self, path: str | Path) -> None:
        """Load adapter weights saved by `save_pretrained`; everything is checked before anything is copied.
        A merged model stays merged, now with the loaded update (see `_load`)."""
        self._load(adapter_files.read_adapter(path))

    def _load(self, adapter: adapter_files.SavedAdapter) -> None:
        """Check `adapter` against this model, then copy it in. Merged, the old update is folded into the
        base weights: it is taken out (unmerge) before the factors change and the new one folded in after,
        else a later unmerge would subtract the new update from weights that hold the old one."""
        expected = self.adapter_state_dict()
        adapter_files.check_fits(adapter, self.aurora_config, self.layout(), expected)
        was_merged = self.merged
        if was_merged:
            self.unmerge()
        with torch.no_grad():
            for key, target in expected.items():
                if key in adapter.tensors:
                    target.copy_(adapter.tensors[key])
            if adapter.momentum_omitted and "aurora_factors_m" in self._modules:
                self.aurora_factors_m.load_state_dict(self.aurora_factors.state_dict())
        if was_merged:
            self.merge()

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | Path, **kwargs: Any) -> "AuroraModel":
        """Wrap `model` as the adapter in `path` says and load its weights (kwargs as for the constructor).

        The files are read and checked (config, checksum) before `model` is touched; an adapter that then
        does not fit the wrapped model undoes the wrapping, so a failed call leaves `model` as it was."""
        adapter = adapter_files.read_adapter(path)
        aurora = cls(model, adapter.config, **kwargs)
        try:
            aurora._load(adapter)
        except BaseException:
            aurora._rollback()
            raise
        return aurora


# transformers' PEFT-integration methods on a base model: passed through, they would act on another adapter
_BASE_ADAPTER_API = frozenset({"add_adapter", "set_adapter", "delete_adapter", "disable_adapters",
                               "enable_adapters", "active_adapters", "active_adapter", "get_adapter_state_dict"})


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

    Keyword arguments go to `AuroraModel` (`momentum_pairs`, `momentum`)."""
    return AuroraModel(model, config, **kwargs)


class TargetPlan(NamedTuple):
    """What `config` means for one model: the target spec (a regex or suffixes), the fusion-site regex and
    the heads, with presets (by name, or the family's default) resolved; `preset` is the one used."""

    target_modules: str | list[str]
    fusion_modules: str | None
    modules_to_save: list[str]
    preset: Preset | None


def resolve_targets(model: nn.Module, config: AuroraConfig, family: Family | None) -> TargetPlan:
    """Resolve `config` against `model`: target_modules None means the family's default preset (PEFT's
    convention); a preset name, full ("blip_retrieval/reference") or short ("reference"), is the preset
    of the model's architecture; fusion_modules None means the preset's sites (the family's default
    preset's when the targets are a regex); modules_to_save None means the preset's heads."""
    spec = config.target_modules
    presets = all_presets()
    own = family.presets if family else {}
    kinds = {preset.kind for preset in (own or presets).values()}
    preset = None
    if spec is None or (isinstance(spec, str) and (spec in presets or spec in kinds)):
        if family is None:
            what = "target_modules is not set" if spec is None else f"target_modules {spec!r} is a preset name"
            raise TargetError(f"{what}, and {type(model).__name__} belongs to no known model family: set "
                              "target_modules to a regex or a list of module-name suffixes")
        if spec in presets and spec not in own:
            other = presets[spec]
            raise TargetError(f"preset {spec!r} is for {_family_title(other)} {other.architecture} models, but "
                              f"{type(model).__name__} is a {family.title} {family.architecture(model)} model: use "
                              f"{family.architecture(model)}/{other.kind} (or the short name {other.kind!r})")
        preset = family.preset(model, spec)
    fusion = config.fusion_modules
    if fusion is None and (config.ice or config.gqt) and family is not None:
        fusion = (preset or family.preset(model)).fusion_modules
    heads = config.modules_to_save
    if heads is None:
        heads = list(preset.modules_to_save) if preset else []
    return TargetPlan(preset.target_modules if preset else spec, fusion, list(heads), preset)


def _family_title(preset: Preset) -> str:
    return next(f.title for f in map(get_family, FAMILY_NAMES) if preset.name in f.presets)


def find_targets(model: nn.Module, spec: str | list[str], exclude: Sequence[str] = ()) -> list[tuple[str, nn.Linear]]:
    """The `nn.Linear` modules matched by `spec` (a regex, full match, or a list of name suffixes), in
    `named_modules` order, outside the module prefixes in `exclude` (momentum copies, which follow their
    online twins instead)."""
    linears = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not any(_has_prefix(name, p) for p in exclude)]
    if isinstance(spec, str):
        pattern = re.compile(spec)
        matched = [(n, m) for n, m in linears if pattern.fullmatch(n)]
    else:
        matched = [(n, m) for n, m in linears if any(_has_suffix(n, s) for s in spec)]
    if not matched:
        names = [n for n, _ in linears]
        probes = [spec] if isinstance(spec, str) else spec
        close = sorted({c for p in probes for c in difflib.get_close_matches(p, names, 5, cutoff=0.3)})
        raise TargetError(
            f"target_modules {spec!r} matched no nn.Linear module (Aurora adapts nn.Linear "
            f"only). Closest names: {close or names[:10]}")
    idle = unmatched_branches(spec, [n for n, _ in linears])
    if idle:
        warnings.warn(f"target_modules: {', '.join(repr(b) for b in idle)} matched no nn.Linear module of "
                      f"{type(model).__name__}; only the other parts of {spec!r} are adapted", UserWarning,
                      stacklevel=3)
    return matched


def unmatched_branches(spec: str | list[str], names: Sequence[str]) -> list[str]:
    """The top-level alternatives of a regex (or the suffixes of a list) that match none of `names`:
    a preset written for another model family typically adapts only part of what it says."""
    if isinstance(spec, str):
        return [b for b in _top_level_alternatives(spec) if not any(re.fullmatch(b, n) for n in names)]
    return [s for s in spec if not any(_has_suffix(n, s) for n in names)]


def _top_level_alternatives(pattern: str) -> list[str]:
    """`a|b(c|d)` → ["a", "b(c|d)"]: split on `|` outside groups, classes and escapes."""
    branches, depth, start, i, in_class = [], 0, 0, 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "|" and depth == 0:
            branches.append(pattern[start:i])
            start = i + 1
        i += 1
    branches.append(pattern[start:])
    return branches if len(branches) > 1 else []


def infer_slice_size(targets: list[tuple[str, nn.Linear]], config: AuroraConfig) -> int:
    """d: the configured slice size, else the target side that divides the most target sides (ties: the
    larger). Where one side divides them all this is the smallest side, the paper's single d×d tensor; the
    sides it does not divide become width classes with their own factors."""
    if config.slice_size:
        d = config.slice_size
    else:
        sides = [w for _, m in targets for w in (m.out_features, m.in_features)]
        d = max(set(sides), key=lambda c: (sum(w % c == 0 for w in sides), c))
    if config.rank > d:
        raise AuroraConfigError(f"rank {config.rank} exceeds the slice size d={d}; choose 1 ≤ rank ≤ {d}")
    return d


def width_classes(layers: Iterable[AuroraLinear], rank: int) -> tuple[list[int], list[int]]:
    """The output and input widths other than d, each with its own factor; the rank must fit every one."""
    layers = list(layers)
    out_widths = sorted({layer.block_out for layer in layers if layer.block_out != layer.d})
    in_widths = sorted({layer.block_in for layer in layers if layer.block_in != layer.d})
    for layer in layers:
        narrow = min(layer.block_out, layer.block_in)
        if rank > narrow:
            raise TargetError(f"rank {rank} exceeds the width {narrow} of {layer.name} "
                              f"({layer.module.out_features}×{layer.module.in_features}), a width class of its "
                              f"own (not a multiple of d={layer.d}): the rank is limited by the smallest width "
                              f"in use; choose rank ≤ {narrow} or leave {layer.name} out of target_modules")
    return out_widths, in_widths

def find_fusion_sites(model: nn.Module, config: AuroraConfig, fusion_modules: str | None) -> list[str]:
    """Names of the cross-attention modules that host ICE/GQT (none when both are off)."""
    if not (config.ice or config.gqt):
        return []
    if fusion_modules is None:
        raise TargetError(f"ice/gqt are on but {type(model).__name__} belongs to no known model family, so "
                          "its fusion sites are unknown: set fusion_modules to a regex of its cross-attention "
                          "modules, or ice=False and gqt=False")
    pattern = re.compile(fusion_modules)
    names = [n for n, _ in model.named_modules() if n and pattern.fullmatch(n)]
    if not names:
        raise TargetError(f"ice/gqt are on but no module matches fusion_modules {fusion_modules!r}; set it to a "
                          "regex of the cross-attention modules, or ice=False and gqt=False")
    return names


def find_modules_to_save(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """Modules trained in full, by name suffix; each configured name must match at least one module."""
    modules = dict(model.named_modules())
    found: dict[str, nn.Module] = {}
    for suffix in names:
        matches = {n: m for n, m in modules.items() if n and _has_suffix(n, suffix)}
        if not matches:
            close = difflib.get_close_matches(suffix, [n.rsplit(".", 1)[-1] for n in modules], 3)
            raise TargetError(f"modules_to_save entry {suffix!r} matches no module"
                              + (f"; did you mean {sorted(set(close))}?" if close else ""))
        found.update(matches)
    return found


def _has_prefix(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _has_suffix(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _site_key(name: str) -> str:
    return name.replace(".", "__")
