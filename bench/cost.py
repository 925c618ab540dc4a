"""Cost of fine-tuning BLIP with Aurora against the frozen model, LoRA (peft) and full fine-tuning.

Measured on LAVIS's real BLIP architectures with random weights, on the CPU (the GPU path: below):

- training step: ``model(samples)`` — LAVIS's own training forward (retrieval: ITC with momentum encoders
  and queues + ITM with hard negatives; VQA: encoder + answer decoder) — then ``loss.backward()``,
  ``AdamW.step()``, ``zero_grad(set_to_none=True)``; for retrieval also the ITM passes alone
  (``itm_step``), where the cross-attention adapters are. Methods run interleaved, round by round (the
  order rotates every round), on one model instance that each method is installed on and removed from
  again; after a warm-up step (which also allocates the optimiser state) the timed steps follow. Time is
  the process's CPU time (and wall time beside it), with one torch thread; ratios are taken within each
  round and the median over rounds is reported, so slow drifts of a shared machine cancel out.
- peak memory (``bench_memory``, a separate pass after every timing): the kernel's high-water mark of
  the process's resident set (VmHWM), reset through ``/proc/self/clear_refs`` after a warm-up step and
  read after one more step. glibc's mmap threshold is fixed at 64 KiB for this pass, so each freed tensor
  leaves the resident set at once and every method starts from the resident model alone. Torch's CPU
  tensors come from malloc, so RSS sees all of them (weights, gradients, AdamW moments, activations) —
  ``tracemalloc`` does not. Reported: the peak, and the peak minus the resident size before the method
  was installed (what training adds on top of the model).
- inference: retrieval ITM scoring of image-text pairs (ViT + multimodal text encoder + ITM head) and
  ITM re-ranking over cached image features (the multimodal text encoder alone, where the adapters are);
  VQA answer scoring (encoder + teacher-forced decoder). ``torch.no_grad()``, eval mode.
- adapter files: ``save_pretrained`` (Aurora's and peft's), bytes of ``adapter_model.safetensors``.

GPU path (``--device cuda``, issue 13). The same methods, interleaved rounds, per-round ratios, tables and
result layout, measured on one CUDA GPU: model, optimiser state and samples live on the GPU, every forward
(training and inference) runs under ``torch.autocast("cuda", dtype=torch.bfloat16)`` (``--dtype fp32``:
without), a step is timed by two ``torch.cuda.Event(enable_timing=True)`` recorded around it (read after
a synchronize; warm-up steps, 3 by default, not timed), and the memory pass reads
``torch.cuda.max_memory_allocated()`` after ``torch.cuda.reset_peak_memory_stats()``, less
``torch.cuda.memory_allocated()`` before the method was installed. Defaults there are LAVIS's fine-tuning
setting: 384 px, the published per-GPU ``batch_size_train`` (retrieval 32, VQA 16), re-ranking
``k_test`` = 256 pairs, 5 timed steps per round. Asking for it without CUDA is an error.

The device is chosen once (``bench._harness.make_device``): ``CpuDevice`` and ``CudaDevice`` implement
one small interface (``timed``, ``autocast``, ``allocated``/``reset_peak``/``peak``, ``release``), and
their class attributes name the result keys, so a CPU and a GPU result never collide: timings are keyed
by clock (``cpu``/``wall`` on the CPU, ``cuda``/``cuda_wall`` on the GPU), memory by ``peak_rss``/
``added_rss``/``resident_model`` or ``peak_cuda``/``added_cuda``/``allocated_cuda``, and
``settings.device`` says which (results without it are CPU results). Columns say "CPU s" or "GPU ms".

Run ``python -m bench.cost`` (BLIP-base, CPU), ``python -m bench.cost --quick`` (tiny models, a smoke
test; its BLIP-base adapter sizes are real, its timings mean nothing), or ``bash bench/gpu.sh`` on a GPU
machine (writes ``bench/results/cost_gpu.{json,md}``). See BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from . import _harness as H

ARCHS = {"retrieval": ("blip_retrieval", "coco"), "vqa": ("blip_vqa", "vqav2")}


def training_methods(rank: int = 64, lora_rank: int = 8, dropout: float = 0.1) -> list[H.Method]:
    aurora = {"rank": rank, "dropout": dropout}
    return [
        H.Method("frozen (floor)", "frozen"),
        H.Method(f"aurora cp R={rank}", "aurora", {**aurora, "core": "cp", "ice": False, "gqt": False}),
        H.Method(f"aurora cp R={rank} +ICE/GQT", "aurora", {**aurora, "core": "cp", "ice": True, "gqt": True}),
        H.Method(f"aurora cp R={rank}, dropout on z", "aurora",
                 {**aurora, "core": "cp", "ice": False, "gqt": False, "dropout_position": "rank"}),
        H.Method(f"aurora cp R={rank} +ICE/GQT, dropout on z", "aurora",
                 {**aurora, "core": "cp", "ice": True, "gqt": True, "dropout_position": "rank"}),
        H.Method(f"aurora tucker R={rank}", "aurora", {**aurora, "core": "tucker", "ice": False, "gqt": False}),
        H.Method(f"aurora tucker R={rank} +ICE/GQT", "aurora",
                 {**aurora, "core": "tucker", "ice": True, "gqt": True}),
        H.Method(f"lora r={lora_rank} (peft)", "lora", {"rank": lora_rank, "dropout": dropout}),
        H.Method("full fine-tuning", "full"),
    ]


def inference_methods(rank: int = 64, lora_rank: int = 8) -> list[H.Method]:
    aurora = {"rank": rank, "core": "cp", "randomise": True}
    return [
        H.Method("base", "frozen_eval"),
        H.Method(f"aurora cp R={rank} unmerged", "aurora", {**aurora, "ice": False, "gqt": False}),
        H.Method(f"aurora cp R={rank} merged", "aurora", {**aurora, "ice": False, "gqt": False, "merged": True}),
        H.Method(f"aurora cp R={rank} +ICE/GQT unmerged", "aurora", {**aurora, "ice": True, "gqt": True}),
        H.Method(f"aurora cp R={rank} +ICE/GQT merged", "aurora",
                 {**aurora, "ice": True, "gqt": True, "merged": True}),
        H.Method(f"lora r={lora_rank} (peft) unmerged", "lora", {"rank": lora_rank}),
    ]


def build(arch: str, size: str, image_size: int | None, device: torch.device | str = "cpu") -> torch.nn.Module:
    """LAVIS BLIP with random weights, on `device`. `wrap_blip` switches LAVIS's fairscale ViT checkpointing
    to PyTorch's non-reentrant form and leaves it so; it is done here up front so that every method runs the
    same ViT."""
    from aurora_pet.families.lavis import checkpoint_without_reentry
    from aurora_pet.families.lavis.build import build_blip

    name, model_type = ARCHS[arch]
    with H.quiet(), _seeded(0):
        model = build_blip(name, model_type, size=size, image_size=image_size)
    checkpoint_without_reentry(model)
    return model.to(device)


def _install(model: torch.nn.Module, method: H.Method) -> H.Active:
    if method.kind == "frozen_eval":
        return H.Active(method, model, [], lambda: None)
    with H.quiet():
        return H.setup(model, method)


# -- training ------------------------------------------------------------------------------------------

def bench_training(model: torch.nn.Module, step: Callable[..., None], methods: Sequence[H.Method], rounds: int,
                   steps: int, warmup: int | None = None, log: Callable[[str], None] = print,
                   install: Callable[[torch.nn.Module, H.Method], H.Active] | None = None,
                   device: H.CpuDevice | None = None) -> dict[str, Any]:
    """Time `step(call, optimizer, seed)` for every method, interleaved round by round, with `device`'s
    clocks (default the CPU's) after `warmup` untimed steps (default the device's); `install` puts a
    method on the model (default: the LAVIS harness's). Timings are keyed by clock (``cpu``/``wall``,
    ``cuda``/``cuda_wall``), then method: a list of steps per round."""
    install = install or _install
    device = device or H.CpuDevice()
    warmup = device.warmup if warmup is None else warmup
    model.train()
    names = [m.name for m in methods]
    times: dict[str, dict[str, list[list[float]]]] = {c: {n: [] for n in names} for c in device.clocks}
    load: list[float] = []
    trainable: dict[str, int] = {}
    scale = device.step_unit[1]
    for round_index in range(rounds):
        for method in H.rotated(methods, round_index):
            device.release()
            active = install(model, method)
            active.call.train()  # new modules (Aurora's wrapper, peft's dropouts) follow the model's mode
            trainable[method.name] = H.count(active.trainable)
            optimizer = H.make_optimizer(active.trainable)
            for seed in range(warmup):
                step(active.call, optimizer, seed)
            measured = {c: [] for c in device.clocks}
            for seed in range(warmup, warmup + steps):
                reading = device.timed(lambda: step(active.call, optimizer, seed))  # noqa: B023 (called at once)
                for clock in device.clocks:
                    measured[clock].append(reading[clock])
                load.append(reading["other_load"])
            for clock in device.clocks:
                times[clock][method.name].append(measured[clock])
            del optimizer
            active.teardown()
            del active
            log(f"  round {round_index + 1}/{rounds} {method.name:<32} "
                + "  ".join(f"{label.lower()} {H.median(measured[c]) * scale:7.3f}"
                            for c, label in zip(device.clocks, device.clock_labels))
                + f" {device.step_unit[0]}/step  other load {load[-1]:.1f}")
    return {**times, "trainable": trainable, "other_load": load}


def bench_memory(model: torch.nn.Module, step: Callable[..., None], methods: Sequence[H.Method],
                 log: Callable[[str], None] = print, device: H.CpuDevice | None = None) -> dict[str, Any]:
    """Peak memory of a training step per method: one warm-up step (it allocates the optimiser state), then
    the peak is reset and one more step is measured. On the CPU the peak is RSS's high-water mark, with
    glibc's mmap threshold fixed at 64 KiB (``H.exact_rss``), so every freed tensor leaves the resident set
    at once and the next method starts from the model alone; this is why it runs last, after every
    timing. On CUDA it is ``max_memory_allocated``. Keyed by ``device.memory_keys``."""
    device = device or H.CpuDevice()
    device.begin_memory_pass()
    model.train()
    peaks, added = {}, {}
    for method in methods:
        device.release()
        before = device.allocated()
        active = _install(model, method)
        active.call.train()
        optimizer = H.make_optimizer(active.trainable)
        step(active.call, optimizer, 0)
        device.reset_peak()
        step(active.call, optimizer, 1)
        peaks[method.name] = device.peak()
        added[method.name] = peaks[method.name] - before
        del optimizer
        active.teardown()
        del active
        log(f"  memory {method.name:<32} peak {peaks[method.name] / 2**30:6.2f} GiB  "
            f"(+{added[method.name] / 2**30:.2f} over {device.memory_base})")
    device.release()
    peak_key, added_key, base_key = device.memory_keys
    return {peak_key: peaks, added_key: added, base_key: device.allocated()}


def lavis_step(samples: dict[str, Any], device: H.CpuDevice | None = None) -> Callable[..., None]:
    """LAVIS's own training forward, ``model(samples).loss`` (under `device`'s autocast), then backward and
    AdamW. `samples` are on the model's device."""
    device = device or H.CpuDevice()

    def step(call: torch.nn.Module, optimizer: torch.optim.Optimizer | None, seed: int) -> None:
        with _seeded(seed, device.rng_devices):  # the same hard negatives / dropout masks for every method
            with device.autocast():
                loss = call(dict(samples)).loss
            loss.backward()
        _optimise(optimizer)

    return step


def itm_step(model: torch.nn.Module, batch: int, image_tokens: int,
             device: H.CpuDevice | None = None) -> Callable[..., None]:
    """Only retrieval's ITM passes, where the cross-attention adapters are: the multimodal text encoder
    over a positive batch and a twice as large negative batch of (fixed, random) image features, the ITM
    head and its cross-entropy, backward and AdamW. No ViT, momentum encoders or queues. Inputs live on
    the model's device; the forward runs under `device`'s autocast."""
    device = device or H.CpuDevice()
    where = next(model.parameters()).device
    tokenizer = model.tokenizer
    texts = [H.CAPTIONS[i % len(H.CAPTIONS)] for i in range(3 * batch)]
    text = tokenizer(texts, padding="max_length", truncation=True, max_length=model.max_txt_len, return_tensors="pt")
    ids = text.input_ids.clone()
    ids[:, 0] = tokenizer.enc_token_id
    width = model.visual_encoder.embed_dim if hasattr(model.visual_encoder, "embed_dim") else 768
    images = torch.randn(3 * batch, image_tokens, width, generator=torch.Generator().manual_seed(0)).to(where)
    labels = torch.cat([torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)]).to(where)
    ids, mask = ids.to(where), text.attention_mask.to(where)
    image_mask = torch.ones(images.shape[:-1], dtype=torch.long, device=where)

    def step(call: torch.nn.Module, optimizer: torch.optim.Optimizer | None, seed: int) -> None:
        with _seeded(seed, device.rng_devices):
            with device.autocast():
                cls = []
                for part in (slice(0, batch), slice(batch, 3 * batch)):  # LAVIS's positive and negative passes
                    out = model.text_encoder(ids[part], attention_mask=mask[part],
                                             encoder_hidden_states=images[part],
                                             encoder_attention_mask=image_mask[part], return_dict=True)
                    cls.append(out.last_hidden_state[:, 0, :])
                loss = torch.nn.functional.cross_entropy(model.itm_head(torch.cat(cls)), labels)
            loss.backward()
        _optimise(optimizer)

    return step


@contextlib.contextmanager
def _seeded(seed: int, devices: Sequence[int] = ()) -> Iterator[None]:
    """The global RNG seeded with ``seed`` inside the block (LAVIS draws ITM negatives and dropout masks
    from it; on a GPU from the RNG of the CUDA `devices`) and as it was after it: the caller's random stream
    is not touched."""
    with torch.random.fork_rng(devices=list(devices)):
        torch.manual_seed(seed)
        yield


def _optimise(optimizer: torch.optim.Optimizer | None) -> None:
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


# -- inference -----------------------------------------------------------------------------------------

def inference_workloads(arch: str, model: torch.nn.Module, samples: dict[str, Any],
                        rerank_batch: int = 0) -> dict[str, Callable[[], Any]]:
    """What is timed in inference: LAVIS's VQA answer scoring, or retrieval's ITM scoring of the batch's
    image-text pairs with and without the ViT (re-ranking reuses image features, as LAVIS's
    `compute_sim_matrix` does), and optionally re-ranking `rerank_batch` pairs per call."""
    if arch == "vqa":
        return {"VQA answer scoring (encoder + decoder)": lambda: model(dict(samples)).loss}
    tokenizer = model.tokenizer
    batch = samples["image"].shape[0]
    where = samples["image"].device

    def tokens(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        text = tokenizer([H.CAPTIONS[i % len(H.CAPTIONS)] for i in range(n)], padding="max_length",
                         truncation=True, max_length=model.max_txt_len, return_tensors="pt")
        ids = text.input_ids.clone()
        ids[:, 0] = tokenizer.enc_token_id
        return ids.to(where), text.attention_mask.to(where)

    with torch.no_grad():
        cached = model.visual_encoder.forward_features(samples["image"])

    def itm(ids: torch.Tensor, mask: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if image_embeds is None:
            image_embeds = model.visual_encoder.forward_features(samples["image"])
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = model.text_encoder(ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                 encoder_attention_mask=atts, return_dict=True)
        return model.itm_head(out.last_hidden_state[:, 0, :])

    ids, mask = tokens(batch)
    workloads = {f"ITM scoring, {batch} pairs (ViT + text encoder)": lambda: itm(ids, mask),
                 f"ITM re-rank, {batch} pairs (cached image features)": lambda: itm(ids, mask, cached)}
    if rerank_batch:
        many_ids, many_mask = tokens(rerank_batch)
        many = cached[torch.arange(rerank_batch, device=where) % batch]
        workloads[f"ITM re-rank, {rerank_batch} pairs (cached image features)"] = lambda: itm(many_ids, many_mask, many)
    return workloads


def bench_inference(arch: str, model: torch.nn.Module, samples: dict[str, Any], methods: Sequence[H.Method],
                    rounds: int, steps: int, rerank_batch: int = 0,
                    log: Callable[[str], None] = print, device: H.CpuDevice | None = None) -> dict[str, Any]:
    """Time every workload of `inference_workloads` per method (one untimed call first, whose output is
    kept for the merge check), interleaved round by round, under ``torch.no_grad()`` and `device`'s
    autocast. Keyed by clock, then workload, then method."""
    device = device or H.CpuDevice()
    model.eval()
    workloads = inference_workloads(arch, model, samples, rerank_batch)
    times = {c: {w: {m.name: [] for m in methods} for w in workloads} for c in device.clocks}
    outputs: dict[str, dict[str, torch.Tensor]] = {w: {} for w in workloads}
    load: list[float] = []
    primary = device.clocks[0]
    for round_index in range(rounds):
        for method in H.rotated(methods, round_index):
            active = _install(model, method)
            active.call.eval()  # Aurora's and peft's adapter dropouts are new modules, in training mode
            with torch.no_grad(), device.autocast():
                for workload, run in workloads.items():
                    outputs[workload][method.name] = run().detach().float().clone()  # warm-up, and the output
                    measured = {c: [] for c in device.clocks}
                    for _ in range(steps):
                        reading = device.timed(run)
                        for clock in device.clocks:
                            measured[clock].append(reading[clock])
                        load.append(reading["other_load"])
                    for clock in device.clocks:
                        times[clock][workload][method.name].append(measured[clock])
            active.teardown()
            del active
            device.release()
            log(f"  round {round_index + 1}/{rounds} {method.name:<36} "
                + "  ".join(f"{H.median(times[primary][w][method.name][-1]) * 1e3:8.1f} ms" for w in workloads))
    # merged and unmerged must compute the same function (a check, not a timing)
    agreement = {}
    for workload, outs in outputs.items():
        for name, out in outs.items():
            if name.endswith(" merged"):
                unmerged = outs.get(name[: -len(" merged")] + " unmerged")
                if unmerged is not None:
                    agreement[f"{workload}: {name}"] = float((out - unmerged).abs().max())
    return {**times, "merge_max_abs_diff": agreement, "other_load": load}


# -- adapter files -------------------------------------------------------------------------------------

def size_configs(arch: str, rank: int = 64, lora_rank: int = 8) -> list[H.Method]:
    aurora = {"rank": rank}
    configs = [
        H.Method(f"aurora cp R={rank} +ICE/GQT +heads (preset default)", "aurora", {**aurora}),
        H.Method(f"aurora cp R={rank} +heads", "aurora", {**aurora, "ice": False, "gqt": False}),
        H.Method(f"aurora cp R={rank} +ICE/GQT, no heads", "aurora", {**aurora, "modules_to_save": []}),
        H.Method(f"aurora cp R={rank}, no heads", "aurora",
                 {**aurora, "ice": False, "gqt": False, "modules_to_save": []}),
        H.Method(f"aurora tucker R={rank} +ICE/GQT +heads", "aurora", {**aurora, "core": "tucker"}),
        H.Method(f"lora r={lora_rank} (peft save_pretrained)", "lora", {"rank": lora_rank}),
    ]
    if arch == "vqa":  # no heads in the VQA presets
        configs = [c for c in configs if "no heads" not in c.name]
        for config in configs:
            config.name = config.name.replace(" +heads", "")
    return configs


def _groups(path: Path) -> dict[str, int]:
    """Bytes of tensor data in a safetensors file, by group (factors, momentum factors, ICE/GQT, heads, LoRA)."""
    from safetensors import safe_open

    groups: dict[str, int] = {}
    with safe_open(str(path), "pt") as handle:
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            if key.startswith("factors_m."):
                group = "momentum factors"
            elif key.startswith("factors."):
                group = "factors"
            elif key.startswith("fusion."):
                group = "ICE/GQT"
            elif key.startswith("heads."):
                group = "heads"
            elif "lora_" in key:
                group = "LoRA momentum twins" if "_m." in key else "LoRA"
            else:
                group = "other"
            groups[group] = groups.get(group, 0) + tensor.numel() * tensor.element_size()
    return groups


def bench_sizes(arch: str, model: torch.nn.Module, configs: Sequence[H.Method]) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, config in enumerate(configs):
            active = _install(model, config)
            path = Path(tmp) / str(index)
            with H.quiet():
                size = active.save(path)
            rows.append({"config": config.name, "trainable": H.count(active.trainable), "file_bytes": size,
                         "groups": _groups(path / "adapter_model.safetensors")})
            active.teardown()
    skip = H.momentum_prefixes(model)
    online = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                 if not any(n == s or n.startswith(s + ".") for s in skip))
    rows.append({"config": "full fine-tuning (online weights, fp32; not written)", "trainable": online // 4,
                 "file_bytes": online, "groups": {}})
    return rows


# -- report ----------------------------------------------------------------------------------------

def _ratios(times: dict[str, list[list[float]]], reference: str) -> dict[str, tuple[float, float, float]]:
    """Median (min, max) over rounds of median(method step) / median(reference step) in the same round."""
    result = {}
    ref = [H.median(r) for r in times[reference]]
    for name, rounds in times.items():
        per_round = [H.median(r) / b for r, b in zip(rounds, ref)]
        low, high = H.spread(per_round)
        result[name] = (H.median(per_round), low, high)
    return result


def _fmt_ratio(value: tuple[float, float, float]) -> str:
    mid, low, high = value
    return f"{mid:.3f} ({low:.2f}–{high:.2f})"


def _device_of(results_or_settings: dict[str, Any]) -> type[H.CpuDevice]:
    """The device class a saved result was measured on (results before the GPU path: the CPU)."""
    settings = results_or_settings.get("settings", results_or_settings)
    return H.DEVICES[settings.get("device", "cpu")]


def training_table(result: dict[str, Any], memory: dict[str, Any] | None = None,
                   device: type[H.CpuDevice] = H.CpuDevice) -> str:
    (main_clock, wall_clock), (main_label, wall_label) = device.clocks, device.clock_labels
    unit, scale = device.step_unit
    cpu, wall = result[main_clock], result[wall_clock]
    names = list(cpu)
    frozen = next(n for n in names if n.startswith("frozen"))
    lora = next((n for n in names if n.startswith("lora")), None)
    full = next((n for n in names if n.startswith("full")), None)
    cpu_frozen, wall_frozen = _ratios(cpu, frozen), _ratios(wall, frozen)
    cpu_lora = _ratios(cpu, lora) if lora else {}
    peak = (memory or {}).get(device.memory_keys[0], {})
    added = (memory or {}).get(device.memory_keys[1], {})
    rows = []
    for name in names:
        row = [name, f"{result['trainable'][name]:,}", f"{H.median(_flat(cpu[name])) * scale:.3f}",
               f"{H.median(_flat(wall[name])) * scale:.3f}", _fmt_ratio(cpu_frozen[name]),
               _fmt_ratio(wall_frozen[name]), _fmt_ratio(cpu_lora[name]) if lora else "–"]
        if memory:
            row += [f"{peak[name] / 2**30:.2f}", f"{added[name] / 2**30:.2f}",
                    f"{peak[name] / peak[full]:.2f}" if full in peak else "–"]
        rows.append(row)
    header = ["method", "trainable", f"{main_label} {unit}/step", f"{wall_label} {unit}/step",
              f"× frozen ({main_label})", f"× frozen ({wall_label})", f"× LoRA ({main_label})"]
    if memory:
        header += [f"{device.memory_label} GiB", "added GiB", "peak × full"]
    return H.markdown_table(header, rows)


def _flat(rounds: list[list[float]]) -> list[float]:
    return [t for r in rounds for t in r]


def inference_table(result: dict[str, Any], device: type[H.CpuDevice] = H.CpuDevice) -> str:
    (main_clock, wall_clock), (main_label, wall_label) = device.clocks, device.clock_labels
    parts = []
    for workload, cpu in result[main_clock].items():
        wall = result[wall_clock][workload]
        cpu_ratio, wall_ratio = _ratios(cpu, "base"), _ratios(wall, "base")
        rows = [[name, f"{H.median(_flat(cpu[name])) * 1e3:.1f}", f"{H.median(_flat(wall[name])) * 1e3:.1f}",
                 _fmt_ratio(cpu_ratio[name]), _fmt_ratio(wall_ratio[name])] for name in cpu]
        parts.append(f"{workload}\n\n" + H.markdown_table(
            ["method", f"{main_label} ms", f"{wall_label} ms", f"× base ({main_label})", f"× base ({wall_label})"],
            rows))
    return "\n\n".join(parts)


def size_table(rows: list[dict[str, Any]]) -> str:
    def kb(n: int) -> str:
        return f"{n / 1e3:,.1f}"

    table = [[r["config"], f"{r['trainable']:,}", kb(r["file_bytes"]),
              ", ".join(f"{g} {kb(b)}" for g, b in r["groups"].items()) or "–"] for r in rows]
    return H.markdown_table(["configuration", "trainable", "file kB", "tensor data by group (kB)"], table)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = _device_of(results)
    archs = list(results["training"])
    fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 3.6), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        times = results["training"][arch][device.clocks[0]]
        frozen = next(n for n in times if n.startswith("frozen"))
        ratios = _ratios(times, frozen)
        names = list(times)
        values = [ratios[n][0] for n in names]
        errors = [[ratios[n][0] - ratios[n][1] for n in names], [ratios[n][2] - ratios[n][0] for n in names]]
        colors = ["#888888" if n.startswith("frozen") else "#1f77b4" if n.startswith("aurora")
                  else "#ff7f0e" if n.startswith("lora") else "#d62728" for n in names]
        ax.barh(range(len(names)), values, xerr=errors, color=colors, capsize=3)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.axvline(1.05, color="black", linewidth=0.6, linestyle="--")
        for i, (v, high) in enumerate(zip(values, [ratios[n][2] for n in names])):
            ax.text(high, i, f"  {v:.2f}×", va="center", fontsize=7)
        setting = results["settings"]
        where = "CPU" if device.name == "cpu" else f"{setting.get('dtype', '')} on {results['machine'].get('gpu', 'GPU')}"
        ax.set_title(f"{arch}: training step {device.clock_labels[0]} time / frozen step\n(BLIP-{setting['size']}, "
                     f"{setting['image_size']} px, batch {batch_of(setting, arch)}, {where})", fontsize=9)
        ax.set_xlabel("ratio (median over rounds; bars: min–max)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# LAVIS's fine-tuning recipes (lavis/projects/blip/train/*.yaml): batch_size_train per GPU — 32 for COCO
# and Flickr30k retrieval (retrieval_{coco,flickr}_ft.yaml), 16 for VQAv2 (vqav2_ft.yaml) — and
# k_test, the candidates ITM re-ranks per query in retrieval evaluation (256 for COCO). Retrieval
# fine-tunes at 384 px, VQAv2 at 480 px; the GPU path takes 384 px for both unless --image-size says.
PUBLISHED_BATCH = {"retrieval": 32, "vqa": 16}
PUBLISHED_K_TEST = 256
GPU_IMAGE_SIZE = 384


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, few repetitions (a smoke test)")
    parser.add_argument("--device", choices=list(H.DEVICES), default="cpu",
                        help="cpu (default: CPU time, RSS) or cuda (CUDA-event time, max_memory_allocated)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                        help="cuda: bf16 autocast (default) or fp32; cpu: fp32 only")
    parser.add_argument("--arch", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    parser.add_argument("--image-size", type=int, default=None,
                        help=f"default: 224 for base on cpu, {GPU_IMAGE_SIZE} for base on cuda, 32 for tiny")
    parser.add_argument("--batch", type=int, default=None,
                        help="default: 2 on cpu and with --quick; on cuda LAVIS's published batch_size_train "
                             + ", ".join(f"{k} {v}" for k, v in PUBLISHED_BATCH.items()))
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; quick 2)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per method and round (default 1 on cpu, 5 on cuda; quick 2)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per method and round before the timed ones (default 1 on cpu, 3 on cuda)")
    parser.add_argument("--rerank-batch", type=int, default=None,
                        help="also time retrieval re-ranking of this many pairs per call "
                             f"(default 8 on cpu, {PUBLISHED_K_TEST} (LAVIS's k_test) on cuda; quick 0)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--skip", nargs="*", default=[], choices=["training", "itm", "inference", "sizes", "memory"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: with other processes on the cores, OpenMP "
                             "threads spin-wait for descheduled peers and 2-thread timings swing 10×)")
    parser.add_argument("--out", type=Path, default=H.RESULTS)
    parser.add_argument("--name", default=None, help="result file stem (default cost, cost_gpu; quick: cost_quick, "
                                                     "cost_gpu_quick)")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="only re-render the tables and plot of a saved result file")
    return parser.parse_args(argv)


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings: what was asked, and each default for the device (no device is touched here).
    ``batch`` is one number, or on cuda without --batch LAVIS's published batch per architecture."""
    gpu = args.device == "cuda"
    size = "tiny" if args.quick else "base"
    if args.quick:
        image_size, batch, rerank = 32, 2, 0
    elif gpu:
        image_size, batch, rerank = GPU_IMAGE_SIZE, dict(PUBLISHED_BATCH), PUBLISHED_K_TEST
    else:
        image_size, batch, rerank = 224, 2, 8
    if args.batch is not None:
        batch = args.batch
    if isinstance(batch, dict):
        batch = {arch: batch[arch] for arch in args.arch}
    device = H.DEVICES[args.device]
    return {"size": size, "image_size": args.image_size or image_size, "batch": batch,
            "rounds": args.rounds or (2 if args.quick else 5),
            "steps": args.steps or (2 if args.quick else 5 if gpu else 1),
            "warmup": device.warmup if args.warmup is None else args.warmup,
            "rerank_batch": rerank if args.rerank_batch is None or args.quick else args.rerank_batch,
            "rank": args.rank, "lora_rank": args.lora_rank, "quick": args.quick, "threads": args.threads,
            "device": args.device, "dtype": args.dtype or device.dtypes[0]}


def batch_of(settings: dict[str, Any], arch: str) -> int:
    """The batch of `arch` (or of a result named after it, e.g. "retrieval ITM passes only")."""
    batch = settings["batch"]
    return batch[arch.split()[0]] if isinstance(batch, dict) else batch


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        report = render(results)
        print(report)
        args.render.with_suffix(".md").write_text(report + "\n")
        if results["training"]:
            plot(results, args.render.with_name(args.render.stem + "_step_time.png"))
        return results

    settings = settings_of(args)
    try:
        device = H.make_device(args.device, settings["dtype"])
    except (H.DeviceUnavailable, ValueError) as error:
        raise SystemExit(f"bench.cost: error: {error}") from None
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # LAVIS, timm and peft chatter
    logging.getLogger("peft").setLevel(logging.ERROR)
    size, image_size, rounds, steps = settings["size"], settings["image_size"], settings["rounds"], settings["steps"]
    name = args.name or ("cost" if device.name == "cpu" else "cost_gpu") + ("_quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {"settings": settings, "machine": {**H.machine(), **device.describe()},
                               "training": {}, "inference": {}, "sizes": {}}
    methods = training_methods(args.rank, args.lora_rank)
    warmup, rerank = settings["warmup"], settings["rerank_batch"]
    for arch in args.arch:
        batch = batch_of(settings, arch)
        print(f"== {arch}: building BLIP-{size} ({image_size} px, batch {batch}, {device.name} {device.dtype})",
              flush=True)
        model = build(arch, size, image_size, device.torch_device)
        samples = H.to_device(H.samples_for(ARCHS[arch][0], batch, image_size), device.torch_device)
        if "training" not in args.skip:
            results["training"][arch] = bench_training(model, lavis_step(samples, device), methods, rounds, steps,
                                                       warmup, device=device)
        if "itm" not in args.skip and arch == "retrieval":
            print("== retrieval: ITM passes only", flush=True)
            tokens = model.visual_encoder.patch_embed.num_patches + 1
            results["training"]["retrieval ITM passes only"] = bench_training(
                model, itm_step(model, batch, tokens, device), [m for m in methods if m.kind != "full"],
                max(2, rounds - 1), steps, warmup, device=device)
        if "inference" not in args.skip:
            results["inference"][arch] = bench_inference(
                arch, model, samples, inference_methods(args.rank, args.lora_rank), min(rounds, 3), max(steps, 2),
                rerank_batch=rerank, device=device)
        if "sizes" not in args.skip and not args.quick:
            results["sizes"][arch] = bench_sizes(arch, model, size_configs(arch, args.rank, args.lora_rank))
        del model, samples
        device.release()
    if "sizes" not in args.skip and args.quick:  # sizes are sizes: always of BLIP-base
        print("== adapter files of BLIP-base retrieval", flush=True)
        model = build("retrieval", "base", 224)
        results["sizes"]["retrieval"] = bench_sizes("retrieval", model, size_configs("retrieval", args.rank,
                                                                                     args.lora_rank))
        del model
        H.release_memory()
    if "memory" not in args.skip:  # last: on the CPU it changes the process's allocator settings for good
        results["memory"] = {}
        for arch in args.arch:
            print(f"== {arch}: peak memory", flush=True)
            model = build(arch, size, image_size, device.torch_device)
            samples = H.to_device(H.samples_for(ARCHS[arch][0], batch_of(settings, arch), image_size),
                                  device.torch_device)
            results["memory"][arch] = bench_memory(model, lavis_step(samples, device), methods, device=device)
            del model, samples
            device.release()
    results["wall_s"] = time.perf_counter() - started
    report = render(results)
    print(report)
    (args.out / f"{name}.md").write_text(report + "\n")
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    if results["training"]:
        plot(results, args.out / f"{name}_step_time.png")
    return results


def render(results: dict[str, Any]) -> str:
    s = results["settings"]
    m = results["machine"]
    device = _device_of(results)
    loads = [v for part in ("training", "inference") for r in results[part].values() for v in r["other_load"]]
    batch = s["batch"]
    batch_text = ", ".join(f"{v} ({k})" for k, v in batch.items()) if isinstance(batch, dict) else f"{batch}"
    if device.name == "cpu":
        where = (f"{s['threads']} torch thread(s); {m['cpu']}, {m['cores']} cores, torch {m['torch']}; "
                 f"other processes kept {H.median(loads) if loads else 0:.1f} cores busy (median)")
    else:
        where = (f"{s['dtype']} {'autocast' if s['dtype'] != 'fp32' else ''}, {s.get('warmup', '?')} warm-up "
                 f"steps; {m.get('gpu', 'GPU')} ({m.get('gpu_memory', 0) / 2**30:.0f} GiB), CUDA "
                 f"{m.get('cuda')}, torch {m['torch']}; host: {m['cores']} cores, other processes kept "
                 f"{H.median(loads) if loads else 0:.1f} busy (median)")
    out = [f"BLIP-{s['size']} (random weights), {s['image_size']} px, batch {batch_text}, {s['rounds']} interleaved "
           f"rounds × {s['steps']} timed steps, {where}; wall {results.get('wall_s', 0):.0f} s"]
    memory = results.get("memory", {})
    for arch, result in results["training"].items():
        out += [f"\n### Training step — {arch}\n", training_table(result, memory.get(arch), device)]
    for arch, result in results["inference"].items():
        out += [f"\n### Inference — {arch}\n", inference_table(result, device)]
        if result["merge_max_abs_diff"]:
            out.append("\nmerged vs unmerged outputs, max |Δ|: " + ", ".join(
                f"{k.split(': ')[1]} {v:.1e}" for k, v in result["merge_max_abs_diff"].items()))
    for arch, rows in results["sizes"].items():
        out += [f"\n### Adapter files — {arch} (BLIP-base)\n", size_table(rows)]
    return "\n".join(out)


if __name__ == "__main__":
    main()
