"""Which modules an adapter adapts: presets resolved against the model, the `nn.Linear` targets, the slice
size d and the width classes, the fusion sites and the heads. Pure lookups over `named_modules`; nothing
here changes the model."""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from torch import nn

from .config import AuroraConfig
from .errors import AuroraConfigError, TargetError
from .families import FAMILY_NAMES, Family, Preset, all_presets, get_family

if TYPE_CHECKING:  # pragma: no cover
    from .layer import AuroraLinear


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
               if isinstance(module, nn.Linear) and not any(has_prefix(name, p) for p in exclude)]
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


def has_prefix(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _has_suffix(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def site_key(name: str) -> str:
    return name.replace(".", "__")
