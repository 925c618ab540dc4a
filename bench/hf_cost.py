"""Training-step cost on transformers models: Aurora against PEFT's LoRA r=8 on the same targets.

Two models with random weights (nothing downloaded): transformers BLIP-base retrieval (the ITM pass over
image features, cross-attention preset) and a Llama-shaped model of about 114M parameters (hidden 768,
12 layers, grouped-query k/v of width 256, MLP width 2048: all seven projections, so the k/v and MLP
widths are width classes). Methods are timed interleaved, round by round (CPU time per step, one
thread), and reported as ratios to LoRA r=8 and to the frozen floor within each round.

    .venv-hf/bin/python -m bench.hf_cost              # both models, 3 rounds × 3 steps: ~10 min on 2 cores
    .venv-hf/bin/python -m bench.hf_cost --quick      # tiny models, one round: seconds (smoke test)
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import _harness as H
from . import cost

LLAMA_TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def methods(rank: int = 64, lora_rank: int = 8, slice_size: int | None = None) -> list[H.Method]:
    """The floor, LoRA and Aurora with dropout 0.1 (on x, and on z = x·V) and 0; with `slice_size`, Aurora at
    that d as well (on the Llama-shaped model d = 768 instead of the inferred 256: fewer slices per target)."""
    rows = [
        H.Method("frozen (floor)", "frozen"),
        H.Method(f"lora r={lora_rank} (peft), dropout 0.1", "lora", {"rank": lora_rank, "dropout": 0.1}),
        H.Method(f"aurora cp R={rank}, dropout 0.1", "aurora", {"rank": rank, "dropout": 0.1}),
        H.Method(f"aurora cp R={rank}, dropout 0.1 on z", "aurora",
                 {"rank": rank, "dropout": 0.1, "dropout_position": "rank"}),
        H.Method(f"lora r={lora_rank} (peft), dropout 0", "lora", {"rank": lora_rank, "dropout": 0.0}),
        H.Method(f"aurora cp R={rank}, dropout 0", "aurora", {"rank": rank, "dropout": 0.0}),
    ]
    if slice_size is not None:
        rows.append(H.Method(f"aurora cp R={rank} d={slice_size}, dropout 0", "aurora",
                             {"rank": rank, "dropout": 0.0, "slice_size": slice_size}))
    return rows


def install(targets: str | None) -> Callable[[torch.nn.Module, H.Method], H.Active]:
    """Put a method on a transformers model: Aurora on `targets` (None: the family's default preset, ICE/GQT
    off), LoRA on the very modules Aurora adapts; the frozen floor trains nothing but runs backward."""
    from aurora_pet import AuroraConfig, get_aurora_model

    def setup(model: torch.nn.Module, method: H.Method) -> H.Active:
        model.requires_grad_(False)
        options = dict(method.options)
        config = AuroraConfig(rank=options.get("rank", 8), target_modules=targets, dropout=options.get("dropout", 0.0),
                              dropout_position=options.get("dropout_position", "input"),
                              slice_size=options.get("slice_size"), modules_to_save=[])
        if method.kind == "aurora":
            aurora = get_aurora_model(model, config)
            return H.Active(method, aurora, [p for p in aurora.parameters() if p.requires_grad],
                            lambda: aurora.unload(), aurora=aurora)
        names = _targets(model, config)
        if method.kind == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            rank = options["rank"]
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=options["dropout"],
                                               target_modules=names), model)
            trainable = [p for n, p in model.named_parameters() if "lora_" in n]
            for parameter in trainable:
                parameter.requires_grad_(True)
            return H.Active(method, model, trainable, lambda: _remove_lora(model))
        # the floor: the frozen model's backward through the text stack, as adapters there need it
        embeddings = model.text_encoder.embeddings if hasattr(model, "text_encoder") else model.get_input_embeddings()
        handle = embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_(True))
        return H.Active(method, model, [], handle.remove)

    return setup


def _targets(model: torch.nn.Module, config: Any) -> list[str]:
    """The modules Aurora adapts under `config`, by Aurora's own matcher."""
    from aurora_pet import get_aurora_model

    aurora = get_aurora_model(model, config)
    names = list(aurora.layers)
    aurora.unload()
    return names


def _remove_lora(model: torch.nn.Module) -> None:
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoraLayer):
                setattr(module, child_name, child.get_base_layer())


def blip_step(batch: int, image_size: int, vocab: int) -> Callable[..., None]:
    def step(call: torch.nn.Module, optimizer: torch.optim.Optimizer | None, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(5, vocab, (batch, 24), generator=generator)
        pixels = torch.randn(batch, 3, image_size, image_size, generator=generator)
        score = call(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, use_itm_head=True).itm_score
        score.logsumexp(-1).mean().backward()
        cost._optimise(optimizer)

    return step


def llama_step(batch: int, length: int, vocab: int) -> Callable[..., None]:
    def step(call: torch.nn.Module, optimizer: torch.optim.Optimizer | None, seed: int) -> None:
        ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
        call(input_ids=ids, labels=ids).loss.backward()
        cost._optimise(optimizer)

    return step


def llama(size: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=32000) if size == "base" else \
        dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(max_position_embeddings=256, **shape))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, one round (a smoke test)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=H.RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    logging.getLogger("peft").setLevel(logging.ERROR)
    from aurora_pet.families.hf.build import build_blip

    size = "tiny" if args.quick else "base"
    rounds, steps = (1, 1) if args.quick else (args.rounds, args.steps)
    rank = 4 if args.quick else 64
    image = 32 if args.quick else 224
    workloads = {  # model, targets, step, the methods
        "hf_blip_retrieval": (lambda: build_blip("retrieval", size, vision_image_size=image), None,
                              blip_step(2, image, 300 if args.quick else 30000), methods(rank)),
        "llama": (lambda: llama(size), LLAMA_TARGETS, llama_step(2, 128, 128 if args.quick else 32000),
                  methods(rank, slice_size=64 if args.quick else 768)),
    }
    results: dict[str, Any] = {"machine": H.machine(), "rounds": rounds, "steps": steps, "models": {}}
    for name, (build, targets, step, rows) in workloads.items():
        print(f"{name} ({size})")
        model = build()
        result = cost.bench_training(model, step, rows, rounds, steps, install=install(targets))
        lora = [m.name for m in rows if m.kind == "lora"]
        result["vs_lora_dropout_0.1"] = cost._ratios(result["cpu"], lora[0])
        result["vs_lora_dropout_0"] = cost._ratios(result["cpu"], lora[1])
        result["vs_floor"] = cost._ratios(result["cpu"], "frozen (floor)")
        results["models"][name] = result
        del model
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (args.out / f"hf_cost{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"hf_cost{suffix}.md").write_text(render(results) + "\n")
    print(render(results))
    return results


def render(results: dict[str, Any]) -> str:
    lines = []
    for name, result in results["models"].items():
        header = ["method", "trainable", "× frozen floor", "× LoRA r=8 (same dropout)"]
        rows = []
        for method, (mid, low, high) in result["vs_floor"].items():
            lora = result["vs_lora_dropout_0" if method.endswith("dropout 0") else "vs_lora_dropout_0.1"]
            rows.append([method, f"{result['trainable'][method]:,}", cost._fmt_ratio((mid, low, high)),
                         cost._fmt_ratio(lora[method]) if "floor" not in method else ""])
        lines += [f"### {name}", "", H.markdown_table(header, rows), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
