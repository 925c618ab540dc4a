"""A/B of Aurora's forward pass: ``AuroraLinear`` of the working tree against the one of a git revision,
interleaved in one process on the same BLIP-base model and workload (retrieval's ITM passes, where the
cross-attention adapters are; see ``cost.itm_step``) and on unmerged ITM re-ranking. Also checks that both
give the same outputs and gradients.

    python -m benchmarks.forward_ab --baseline 53df419   # the revision before the forward optimisation
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import _harness as H
from . import cost

ROOT = Path(__file__).resolve().parents[1]


def baseline_layer(revision: str):
    """`aurora_pet/layer.py` as of `revision`, imported as a module beside the package."""
    source = subprocess.run(["git", "show", f"{revision}:aurora_pet/layer.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "layer_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("aurora_pet.layer_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _methods(cls) -> dict[str, Any]:
    return {k: v for k, v in vars(cls).items() if callable(v) or isinstance(v, property)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="53df419", help="git revision of the baseline layer.py")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--size", default="base")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from aurora_pet import layer

    current, baseline = _methods(layer.AuroraLinear), _methods(baseline_layer(args.baseline).AuroraLinear)

    def use(impl: dict[str, Any]) -> None:
        for name in set(current) | set(baseline):
            if name in impl:
                setattr(layer.AuroraLinear, name, impl[name])
            elif name in vars(layer.AuroraLinear):
                delattr(layer.AuroraLinear, name)

    model = cost.build("retrieval", args.size, args.image_size)
    step = cost.itm_step(model, 2, model.visual_encoder.patch_embed.num_patches + 1)
    variants = [("frozen (floor)", None, H.Method("frozen", "frozen"))]
    for dropout in (0.1, 0.0):
        for tag, impl in ((f"baseline {args.baseline}", baseline), ("working tree", current)):
            variants.append((f"{tag}, dropout {dropout}", impl,
                             H.Method("aurora", "aurora", {"ice": False, "gqt": False, "dropout": dropout})))
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    model.train()
    for round_index in range(args.rounds):
        for name, impl, method in H.rotated(variants, round_index):
            use(impl or current)
            with H.quiet():
                active = H.setup(model, method)
            active.call.train()
            optimizer = H.make_optimizer(active.trainable)
            step(active.call, optimizer, 0)
            for seed in range(1, args.steps + 1):
                start = time.process_time()
                step(active.call, optimizer, seed)
                times[name].append(time.process_time() - start)
            active.teardown()
    use(current)
    floor = statistics.median(times["frozen (floor)"])
    rows = [[name, f"{statistics.median(t) * 1e3:.0f}", f"{statistics.median(t) / floor:.3f}"]
            for name, t in times.items()]
    print("ITM passes, training step (CPU time)\n")
    print(H.markdown_table(["variant", "CPU ms/step (median)", "× frozen"], rows))
    inference = _inference(model, args, use, current, baseline)
    base = statistics.median(inference["base"])
    rows = [[name, f"{statistics.median(t) * 1e3:.1f}", f"{statistics.median(t) / base:.3f}"]
            for name, t in inference.items()]
    print("\nITM re-rank of 2 pairs over cached image features, unmerged, no_grad (CPU time)\n")
    print(H.markdown_table(["variant", "CPU ms/call (median)", "× base"], rows))
    print(f"max |Δ| of outputs and gradients, working tree vs baseline: {_agreement(model, baseline, use, current):.1e}")
    return {"times": times, "inference": inference}


def _inference(model: torch.nn.Module, args, use, current: dict[str, Any], baseline: dict[str, Any]):
    model.eval()
    samples = H.retrieval_samples(2, args.image_size)
    rerank = list(cost.inference_workloads("retrieval", model, samples).values())[1]
    variants = [("base", None), (f"baseline {args.baseline}", baseline), ("working tree", current)]
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for round_index in range(args.rounds + 1):
        for name, impl in H.rotated(variants, round_index):
            use(impl or current)
            method = (H.Method("base", "frozen_eval") if impl is None else
                      H.Method("aurora", "aurora", {"ice": False, "gqt": False, "randomise": True}))
            active = cost._install(model, method)
            active.call.eval()
            with torch.no_grad():
                rerank()
                for _ in range(5):
                    start = time.process_time()
                    rerank()
                    times[name].append(time.process_time() - start)
            active.teardown()
    use(current)
    return times


def _agreement(model: torch.nn.Module, baseline: dict[str, Any], use, current: dict[str, Any]) -> float:
    """Outputs and factor gradients of both implementations on the same perturbed adapter, dropout off."""
    results = []
    samples = H.retrieval_samples(2, model.visual_encoder.patch_embed.img_size[0])
    for impl in (baseline, current):
        use(impl)
        with H.quiet():
            active = H.setup(model, H.Method("a", "aurora", {"dropout": 0.0, "randomise": True}))
        active.call.eval()
        itm = list(cost.inference_workloads("retrieval", model, samples).values())[1]
        out = itm()
        out.pow(2).sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in active.aurora.aurora_factors.parameters()])
        active.teardown()
        model.zero_grad(set_to_none=True)
    use(current)
    return max(float((a - b).abs().max()) for a, b in zip(*results))


if __name__ == "__main__":
    main()
