"""Shared pieces of the benchmarks: setting each fine-tuning method up on a LAVIS BLIP model and tearing
it down again (so one model instance serves every method, and methods can be interleaved round by round),
memory probes, inputs and statistics.

Methods (``Method.kind``):

- ``frozen``  the floor. Every base weight frozen; the task heads of the preset (retrieval: ``itm_head``,
              ``vision_proj``, ``text_proj``; VQA: none) train, and the hidden states entering every
              *multimodal* text stack (the ITM pass of the text encoder, the VQA encoder and decoder) are
              made to require grad, so backward runs through every layer that an adapter on the text
              cross-attention must back-propagate through — activations only, no base-weight gradients.
              It is Aurora's step with a zero-cost adapter.
- ``heads``   only the task heads train (no backward through the encoders).
- ``aurora``  ``wrap_blip(model, preset, **options)``.
- ``lora``    peft 0.13.2 ``LoraConfig`` on exactly Aurora's targets (found with Aurora's own matcher), and on
              their momentum twins (frozen; LAVIS's momentum update zips parameters by position, so the
              twins must carry the same LoRA parameters — they then follow an EMA of the online LoRA, as
              Aurora's momentum factors do). The heads train as for Aurora.
- ``full``    every online parameter trains (the momentum copies stay frozen, as in LAVIS).

``inject_peft`` installs peft's LoRA or VeRA on the same targets (and twins) in place, leaving the LAVIS model
a LAVIS model: the learning benchmark trains it through the recipes' trainer.

Devices (``make_device``): ``CpuDevice`` and ``CudaDevice`` share one small interface — ``timed(run)``
(seconds per clock), ``autocast()``, ``allocated()`` / ``reset_peak()`` / ``peak()`` for the memory pass,
``release()`` — and say through class attributes how their results are keyed and labelled, so a benchmark
picks its device once and has no branches on it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import io
import os
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from aurora_pet.families import get_preset
    from aurora_pet.families.lavis import FAMILY as LAVIS
    from aurora_pet.families.lavis.wrap import wrap_blip
    from aurora_pet.model import AuroraModel, find_targets

RESULTS = Path(__file__).with_name("results")


# -- methods ---------------------------------------------------------------------------------------

@dataclass
class Method:
    name: str
    kind: str  # frozen | heads | aurora | lora | full
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Active:
    """A method installed on a model: what to call, what to optimise, how to undo it."""

    method: Method
    call: nn.Module
    trainable: list[nn.Parameter]
    teardown: Callable[[], None]
    aurora: AuroraModel | None = None
    peft: Any = None

    def save(self, path: Path) -> int:
        """Write the method's adapter file; bytes of the weights file."""
        if self.aurora is not None:
            self.aurora.save_pretrained(path)
        elif self.peft is not None:
            self.peft.save_pretrained(str(path))
        else:
            raise ValueError(f"{self.method.name} has no adapter file")
        return (Path(path) / "adapter_model.safetensors").stat().st_size


def arch_of(model: nn.Module) -> str:
    return LAVIS.architecture(model)


def heads_of(model: nn.Module, preset: str = "cross-attention") -> list[str]:
    return list(get_preset(f"{arch_of(model)}/{preset}").modules_to_save)


def momentum_prefixes(model: nn.Module) -> list[str]:
    return [tracking for _, tracking in LAVIS.momentum_pairs(model)]


def _set_heads(model: nn.Module, heads: Sequence[str]) -> list[nn.Parameter]:
    modules = dict(model.named_modules())
    params = []
    for name in heads:
        for parameter in modules[name].parameters():
            parameter.requires_grad_(True)
            params.append(parameter)
    return params


def _freeze(model: nn.Module) -> None:
    model.requires_grad_(False)


def setup(model: nn.Module, method: Method) -> Active:
    """Install `method` on `model` (all parameters frozen beforehand, as `teardown` leaves them)."""
    _freeze(model)
    opts = dict(method.options)
    if method.kind == "frozen":
        handles = _floor_hooks(model)
        trainable = _set_heads(model, heads_of(model, opts.get("preset", "cross-attention")))

        def teardown() -> None:
            for handle in handles:
                handle.remove()
            _freeze(model)

        return Active(method, model, trainable, teardown)
    if method.kind == "heads":
        heads = opts.get("heads") or heads_of(model, opts.get("preset", "cross-attention"))
        trainable = _set_heads(model, heads)
        return Active(method, model, trainable, lambda: _freeze(model))
    if method.kind == "full":
        skip = momentum_prefixes(model)
        trainable = []
        for name, parameter in model.named_parameters():
            if not any(name == p or name.startswith(p + ".") for p in skip):
                parameter.requires_grad_(True)
                trainable.append(parameter)
        return Active(method, model, trainable, lambda: _freeze(model))
    if method.kind == "aurora":
        return _setup_aurora(model, method, opts)
    if method.kind == "lora":
        return _setup_lora(model, method, opts)
    raise ValueError(f"unknown method kind {method.kind!r}")


def _setup_aurora(model: nn.Module, method: Method, opts: dict[str, Any]) -> Active:
    preset = opts.pop("preset", "cross-attention")
    merged = opts.pop("merged", False)
    randomise = opts.pop("randomise", False)
    aurora = wrap_blip(model, preset, **opts)
    if randomise:  # a trained-looking adapter (V ≠ 0, ICE/GQT ≠ 0): outputs differ from the base model
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in list(aurora.aurora_factors.parameters()) + list(aurora.aurora_fusion.parameters()):
                parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator).to(parameter.device))
    if merged:
        aurora.merge()
    trainable = [p for p in aurora.parameters() if p.requires_grad]

    def teardown() -> None:
        if aurora.merged:
            aurora.unmerge()
        aurora.unload()  # also undoes the LAVIS family's patches (momentum update, decoder cache)
        _freeze(model)

    return Active(method, aurora, trainable, teardown, aurora=aurora)


def aurora_targets(model: nn.Module, preset: str = "cross-attention") -> list[str]:
    """The online modules Aurora adapts under `preset`, by Aurora's own matcher."""
    spec = get_preset(f"{arch_of(model)}/{preset}").target_modules
    return [name for name, _ in find_targets(model, spec, exclude=momentum_prefixes(model))]


def lora_targets(model: nn.Module, preset: str = "cross-attention") -> tuple[list[str], list[str]]:
    """(online targets, their momentum twins): Aurora's targets, and the twins LAVIS pairs them with."""
    online = aurora_targets(model, preset)
    twins = []
    for source, tracking in LAVIS.momentum_pairs(model):
        twins += [tracking + name[len(source):] for name in online if name.startswith(source + ".")]
    return online, twins


def _setup_lora(model: nn.Module, method: Method, opts: dict[str, Any]) -> Active:
    from peft import LoraConfig, get_peft_model

    preset = opts.get("preset", "cross-attention")
    rank = opts.get("rank", 8)
    online, twins = lora_targets(model, preset)
    config = LoraConfig(r=rank, lora_alpha=opts.get("alpha", 2 * rank), lora_dropout=opts.get("dropout", 0.1),
                        target_modules=online + twins)
    peft_model = get_peft_model(model, config)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.requires_grad_(not any(name.startswith(t + ".") for t in twins))
    heads = opts.get("heads", heads_of(model, preset))
    _set_heads(model, heads)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def teardown() -> None:
        peft_model.unload()
        model.__dict__.pop("peft_config", None)
        _freeze(model)

    return Active(method, peft_model, trainable, teardown, peft=peft_model)


def inject_peft(model: nn.Module, kind: str = "lora", *, preset: str = "cross-attention", rank: int = 8,
                alpha: float | None = None, dropout: float = 0.0, prng_key: int = 0) -> int:
    """peft LoRA (``kind="lora"``) or VeRA (``kind="vera"``) on Aurora's targets of `preset`, in place, with
    peft's ``inject_adapter_in_model`` (the model stays the LAVIS model, as the recipes' trainer needs).

    The momentum twins get the same adapter, frozen, starting as copies (LAVIS zips online and momentum
    parameters by position, so they then follow an EMA of the online one). LoRA: ``lora_alpha = alpha or
    2·rank``. VeRA (Kopiczko et al. 2024): frozen random ``A ∈ R^{rank×d_in}``, ``B ∈ R^{d_out×rank}``
    shared by every target (peft slices them from the largest shape, drawn from ``prng_key``) and trainable
    scaling vectors ``d ∈ R^rank`` (``vera_lambda_d``, initialised to 0.1) and ``b ∈ R^{d_out}``
    (``vera_lambda_b``, zero), ``ΔW = diag(b) B diag(d) A``. Every other parameter is frozen (the caller
    enables heads). Returns the online adapter's trainable count."""
    from peft import LoraConfig, VeraConfig, inject_adapter_in_model

    online, twins = lora_targets(model, preset)
    if kind == "lora":
        config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout,
                            target_modules=online + twins)
        marker = "lora_"
    elif kind == "vera":
        config = VeraConfig(r=rank, vera_dropout=dropout, projection_prng_key=prng_key, save_projection=False,
                            target_modules=online + twins)
        marker = "vera_lambda_"
    else:
        raise ValueError(f"unknown peft method {kind!r} (lora | vera)")
    inject_adapter_in_model(config, model)
    model.requires_grad_(False)
    params = dict(model.named_parameters())
    pairs = dict(zip(online, twins)) if len(online) == len(twins) else {}
    total = 0
    for name, parameter in params.items():
        source = next((t for t in online if name.startswith(t + ".")), None)
        if marker not in name or source is None:
            continue
        parameter.requires_grad_(True)
        total += parameter.numel()
        if source in pairs:
            with torch.no_grad():
                params[pairs[source] + name[len(source):]].copy_(parameter)
    return total


def vera_rank_for(model: nn.Module, count: int, preset: str = "cross-attention") -> int:
    """VeRA's rank whose trainable count on `preset`'s targets, Σ (rank + d_out), is closest to `count`."""
    online, _ = lora_targets(model, preset)
    modules = dict(model.named_modules())
    outputs = sum(modules[name].out_features for name in online)
    return max(1, round((count - outputs) / len(online)))


def _floor_hooks(model: nn.Module) -> list[Any]:
    """Make the hidden states entering each multimodal BERT stack require grad (see the module doc)."""
    from lavis.models.med import BertEncoder

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if not torch.is_grad_enabled() or kwargs.get("encoder_hidden_states") is None:
            return None
        if kwargs.get("mode", "multimodal") != "multimodal":
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.requires_grad:
            return None
        hidden = hidden.detach().requires_grad_(True)
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    return [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in model.modules()
            if isinstance(m, BertEncoder)]


def count(parameters: Sequence[nn.Parameter]) -> int:
    return sum(p.numel() for p in parameters)


def make_optimizer(parameters: Sequence[nn.Parameter], lr: float = 1e-5, weight_decay: float = 0.05):
    """AdamW as LAVIS's runner uses it (None when nothing trains)."""
    parameters = list(parameters)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay) if parameters else None


# -- inputs ----------------------------------------------------------------------------------------

CAPTIONS = ["a red circle on the left of a blue square", "two green triangles above a yellow star",
            "a small purple square in the middle", "a big orange circle next to a white triangle"]
QUESTIONS = ["what color is the circle", "how many triangles are there", "where is the square",
             "what shape is on the left"]
ANSWERS = [["red", "blue"], ["two", "2"], ["middle", "center"], ["circle", "square"]]


def retrieval_samples(batch: int, image_size: int, seed: int = 0) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(batch, 3, image_size, image_size, generator=generator),
            "text_input": [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)],
            "image_id": torch.arange(batch), "epoch": 0, "iters": 0, "num_iters_per_epoch": 100}


def vqa_samples(batch: int, image_size: int, seed: int = 0) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    answers = [a for i in range(batch) for a in ANSWERS[i % len(ANSWERS)]]
    return {"image": torch.randn(batch, 3, image_size, image_size, generator=generator),
            "text_input": [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)],
            "answer": answers, "weight": torch.full((len(answers),), 0.5),
            "n_answers": torch.full((batch,), 2, dtype=torch.long)}


def samples_for(arch: str, batch: int, image_size: int, seed: int = 0) -> dict[str, Any]:
    return (retrieval_samples if arch == "blip_retrieval" else vqa_samples)(batch, image_size, seed)


# -- memory ----------------------------------------------------------------------------------------

_LIBC = None


def release_memory() -> None:
    """Collect garbage and hand free heap pages back to the OS, so RSS is what is live."""
    global _LIBC
    gc.collect()
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except OSError:  # not glibc
        pass


def exact_rss() -> bool:
    """Make RSS follow live memory exactly: glibc serves every allocation of 64 KiB or more with its own
    mmap, returned to the OS on free (no heap fragmentation carried from one method to the next).
    Irreversible for the process (the dynamic threshold stays off), so call it after all timings."""
    global _LIBC
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        return bool(_LIBC.mallopt(-3, 64 * 1024)) and bool(_LIBC.mallopt(-1, 128 * 1024))  # MMAP_, TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (VmHWM); Linux ≥ 4.0."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def cpu_counters() -> tuple[float, float]:
    """(seconds of CPU the whole machine has been busy, seconds of CPU this process has used)."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    busy = sum(fields) - fields[3] - fields[4]  # everything but idle and iowait
    return busy / tick, sum(os.times()[:2])


def other_load(start: tuple[float, float], end: tuple[float, float], wall: float) -> float:
    """Average number of cores other processes kept busy between two `cpu_counters()` readings."""
    return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / wall) if wall > 0 else 0.0


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(r"VmHWM:\s+(\d+)\s+kB", handle.read()).group(1)) * 1024


# -- statistics and output -------------------------------------------------------------------------

def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> tuple[float, float]:
    return (min(values), max(values)) if values else (float("nan"), float("nan"))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def rotated(items: Sequence[Any], shift: int) -> list[Any]:
    shift %= max(len(items), 1)
    return list(items[shift:]) + list(items[:shift])


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Keep LAVIS / peft chatter (prints, progress bars) off the console inside benchmarks. Warnings
    filters and log levels are process-wide: the benchmarks' mains set them."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def machine() -> dict[str, Any]:
    import platform

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


# -- devices: how a step is timed and how its peak memory is read -----------------------------------

class DeviceUnavailable(RuntimeError):
    """The device asked for is not there (``--device cuda`` without a CUDA GPU)."""


def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (a sample dict, a list) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


class CpuDevice:
    """The CPU path. A step's time is the process's CPU time (``time.process_time``) and its wall time
    beside it, with the load other processes put on the machine meanwhile; peak memory is the kernel's
    high-water mark of the resident set (VmHWM), reset through ``/proc/self/clear_refs``, with glibc's
    mmap threshold fixed first (``exact_rss``) so the resident set follows live memory. fp32 only.

    The class attributes say how results are keyed and labelled, so saved results render without the
    device: ``clocks`` are the keys of the timings (the first is the one ratios and plots use),
    ``memory_keys`` those of (peak, peak minus what was allocated before the method was installed, what
    is allocated after the pass)."""

    name = "cpu"
    clocks = ("cpu", "wall")
    clock_labels = ("CPU", "wall")
    step_unit = ("s", 1.0)  # training-step columns: unit, factor from seconds
    memory_keys = ("peak_rss", "added_rss", "resident_model")
    memory_label = "peak RSS"
    memory_base = "the resident model"
    warmup = 1
    dtypes = ("fp32",)

    def __init__(self, dtype: str | None = None) -> None:
        dtype = dtype or self.dtypes[0]
        if dtype not in self.dtypes:
            raise ValueError(f"--dtype {dtype} is not available on {self.name} (choose from {', '.join(self.dtypes)})")
        self.dtype = dtype
        self.torch_device = torch.device(self.name)
        self.rng_devices: list[int] = []  # CUDA devices whose RNG `fork_rng` saves and restores

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def timed(self, run: Callable[[], Any]) -> dict[str, float]:
        """Run `run` once; {clock: seconds, ..., "other_load": cores other processes kept busy}."""
        counters, start_cpu, start = cpu_counters(), time.process_time(), time.perf_counter()
        run()
        wall = time.perf_counter() - start
        cpu = time.process_time() - start_cpu
        return {"cpu": cpu, "wall": wall, "other_load": other_load(counters, cpu_counters(), wall)}

    def release(self) -> None:
        release_memory()

    def begin_memory_pass(self) -> None:
        exact_rss()

    def allocated(self) -> int:
        return rss_bytes()

    def reset_peak(self) -> None:
        reset_peak_rss()

    def peak(self) -> int:
        return peak_rss_bytes()

    def describe(self) -> dict[str, Any]:
        return {}


class CudaDevice(CpuDevice):
    """The GPU path (one CUDA device). Model, optimiser state and samples live on the GPU; the forward runs
    under ``torch.autocast("cuda", dtype=torch.bfloat16)`` (``dtype="bf16"``, the default) or in fp32.
    A step's time is the GPU time between two ``torch.cuda.Event(enable_timing=True)`` recorded around it
    (after a ``synchronize``, so no earlier work is inside; read after the end event has completed), with
    the host's wall time to that point beside it. Peak memory is ``torch.cuda.max_memory_allocated()``
    after ``torch.cuda.reset_peak_memory_stats()``, and "added" is the peak minus
    ``torch.cuda.memory_allocated()`` before the method was installed (tensors only: the caching
    allocator's reserve is not counted)."""

    name = "cuda"
    clocks = ("cuda", "cuda_wall")
    clock_labels = ("GPU", "wall")
    step_unit = ("ms", 1e3)
    memory_keys = ("peak_cuda", "added_cuda", "allocated_cuda")
    memory_label = "peak GPU"
    memory_base = "the model on the GPU"
    warmup = 3  # cuBLAS handles, autotuning and the caching allocator's growth fall in the first steps
    dtypes = ("bf16", "fp32")

    def __init__(self, dtype: str | None = None) -> None:
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                "--device cuda needs a CUDA GPU, and torch.cuda.is_available() is False here "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); "
                "run without --device (the CPU path) or on a machine with a GPU (bench/gpu.sh)")
        super().__init__(dtype)
        index = torch.cuda.current_device()
        self.torch_device = torch.device("cuda", index)
        self.rng_devices = [index]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def timed(self, run: Callable[[], Any]) -> dict[str, float]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        counters, wall_start = cpu_counters(), time.perf_counter()
        start.record()
        run()
        end.record()
        end.synchronize()
        wall = time.perf_counter() - wall_start
        return {"cuda": start.elapsed_time(end) / 1e3, "cuda_wall": wall,
                "other_load": other_load(counters, cpu_counters(), wall)}

    def release(self) -> None:
        release_memory()
        torch.cuda.synchronize()

    def begin_memory_pass(self) -> None:
        pass

    def allocated(self) -> int:
        return torch.cuda.memory_allocated()

    def reset_peak(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    def describe(self) -> dict[str, Any]:
        props = torch.cuda.get_device_properties(self.torch_device)
        return {"gpu": props.name, "gpu_memory": props.total_memory, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(), "dtype": self.dtype,
                "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


DEVICES: dict[str, type[CpuDevice]] = {"cpu": CpuDevice, "cuda": CudaDevice}


def make_device(name: str = "cpu", dtype: str | None = None) -> CpuDevice:
    """The device `name` (``cpu`` | ``cuda``), chosen once; `DeviceUnavailable` if it is not there."""
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r} (choose from {', '.join(DEVICES)})")
    return DEVICES[name](dtype)
