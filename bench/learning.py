"""Learning efficiency: a pre-trained tiny BLIP adapted to the demo's shifted domain by each method.

What runs: the demo's pieces (``aurora_pet.demo``) — the tiny LAVIS ``BlipRetrieval`` pre-trained on the
generated *source* domain (shipped with the package, or cached), the generated *shifted* domain in
Flickr30k's annotation format, the demo's adaptation settings (``ADAPT_DATA``, ``ADAPT_RUN``,
``DEMO_AURORA``) — and the recipes' trainer (``aurora_pet.training.train``: LAVIS's runner, ITC + ITM
training, LAVIS's retrieval evaluation with ITM re-ranking). Every method trains on the shifted training
split for the demo's epochs and is scored on the test split after the last epoch (no per-epoch validation:
it would cost a third of each run): R@1 in both directions and their mean, and mean recall.

Methods, all from the same pre-trained weights:
- ``heads``: only the task heads (``itm_head``, ``vision_proj``, ``text_proj``) train;
- ``aurora``: the recipe's ``aurora:`` section (the demo's: cross-attention preset + the heads); a rank
  sweep and an ICE/GQT ablation;
- ``lora``: peft 0.13.2 LoRA injected into the same cross-attention targets (and into their momentum
  twins, frozen, initialised as copies and following LAVIS's EMA), plus the heads; at the usual rank 8
  and at the rank whose parameter count matches Aurora's adapter;
- ``full``: every parameter (the recipe without an ``aurora:`` section).
LoRA and heads-only reuse the trainer by swapping its model builder for one that installs them on the
loaded LAVIS model (``_method_model``); everything else (data, optimiser, evaluation) is the trainer's.

Learning rates are fixed a priori, not tuned per method: the demo's adaptation rate for the
parameter-efficient methods and the heads, the pre-training rate for full fine-tuning.

Run ``python -m bench.learning`` (about 35 minutes on 2 cores) or ``--quick`` (a few minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aurora_pet.demo.pretrained import PRETRAIN, PretrainedTiny, pretrained_tiny_blip
from aurora_pet.demo.recipe import ADAPT_DATA, ADAPT_RUN, ARCH, DEMO_AURORA, demo_recipe, write_demo_data
from aurora_pet.training.data import write_recipe
from aurora_pet.training.evaluate import evaluate
from aurora_pet.training.trainer import train

from . import _harness as H

HEADS = ["itm_head", "vision_proj", "text_proj"]


@dataclass
class Spec:
    name: str
    kind: str  # heads | aurora | lora | full
    options: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None  # None: the demo's adaptation rate
    group: str = "methods"  # methods | rank sweep | ICE/GQT ablation


# -- the small interface to the demo and the trainer ------------------------------------------------

@dataclass
class Setup:
    """Pre-trained weights and the written shifted-domain data, shared by every run."""

    pretrained: PretrainedTiny
    written: dict[str, Any]
    work: Path
    epochs: int


def prepare(work: Path, cache_dir: Path | None, epochs: int, n_test: int | None = None,
            verbose: bool = False) -> Setup:
    """The demo's pre-trained model and shifted-domain data (`n_test` test images instead of the demo's)."""
    data = {**ADAPT_DATA, **({"n_test": n_test} if n_test else {})}
    with H.quiet(not verbose):
        pretrained = pretrained_tiny_blip(ARCH, cache_dir)
        written = write_demo_data(work / "data", "shifted", **data)
    return Setup(pretrained, written, work, epochs)


def demo_aurora(**overrides: Any) -> dict[str, Any]:
    return {**DEMO_AURORA, **overrides}


def run(setup: Setup, spec: Spec, seed: int, index: int, verbose: bool = False) -> dict[str, Any]:
    """Train and test one method with one seed; metrics, trainable parameters, seconds."""
    out = setup.work / f"run{index:03d}"
    aurora = demo_aurora(**spec.options, init_seed=seed) if spec.kind == "aurora" else None
    run_cfg = {"seed": seed, "init_lr": spec.lr or ADAPT_RUN["init_lr"], "max_epoch": setup.epochs,
               "save_resume_state": False, "plot": False, "valid_splits": []}
    recipe = demo_recipe(setup.written, out / "run", pretrained=setup.pretrained, aurora=aurora, run=run_cfg)
    path = write_recipe(out / "recipe.yaml", recipe)
    start = time.perf_counter()
    with H.quiet(not verbose):
        result = train(path, quiet=True, prepare_model=_prepare(spec))
    seconds = time.perf_counter() - start
    model = result.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    final = {k[len("test_"):]: float(v) for k, v in (result.final or {}).items()
             if k.startswith("test_") and isinstance(v, (int, float))}
    final["r1_mean"] = (final.get("txt_r1", 0.0) + final.get("img_r1", 0.0)) / 2
    return {"method": spec.name, "group": spec.group, "kind": spec.kind, "seed": seed, "trainable": trainable,
            "metrics": final, "seconds": seconds}


def evaluate_pretrained(setup: Setup, verbose: bool = False) -> dict[str, float]:
    """The pre-trained model on the shifted test split, before any adaptation."""
    out = setup.work / "before"
    recipe = demo_recipe(setup.written, out / "run", pretrained=setup.pretrained, aurora=demo_aurora())
    path = write_recipe(out / "recipe.yaml", recipe)
    with H.quiet(not verbose):
        metrics = evaluate(path, [f"run.output_dir={out / 'eval'}"], quiet=not verbose)
    metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    metrics["r1_mean"] = (metrics.get("txt_r1", 0.0) + metrics.get("img_r1", 0.0)) / 2
    return metrics


def _prepare(spec: Spec) -> Callable[[Any], None] | None:
    """The trainer's `prepare_model` hook that installs LoRA or heads-only on the built LAVIS model."""
    if spec.kind not in ("lora", "heads"):
        return None

    def prepare(lavis_model: Any) -> None:
        if spec.kind == "lora":
            inject_lora(lavis_model, **spec.options)
        else:
            lavis_model.requires_grad_(False)
        for name in HEADS:
            getattr(lavis_model, name).requires_grad_(True)

    return prepare


def inject_lora(model, rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
                preset: str = "cross-attention") -> int:
    """peft LoRA on Aurora's targets of `preset`, in place; the momentum twins get the same LoRA, frozen,
    starting as copies (LAVIS zips online and momentum parameters by position). Returns the online count."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    online, twins = H.lora_targets(model, preset)
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, target_modules=online + twins)
    inject_adapter_in_model(config, model)
    model.requires_grad_(False)
    params = dict(model.named_parameters())
    count = 0
    pairs = dict(zip(online, twins)) if len(online) == len(twins) else {}
    for name, parameter in params.items():
        if "lora_" in name and any(name.startswith(t + ".") for t in online):
            parameter.requires_grad_(True)
            count += parameter.numel()
            for source, twin in pairs.items():
                if name.startswith(source + "."):
                    with torch.no_grad():
                        params[twin + name[len(source):]].copy_(parameter)
    return count


# -- the plan ----------------------------------------------------------------------------------------

def adapter_count(rank: int, ice: bool = True, gqt: bool = True, d: int = 64, slices: int = 8, sites: int = 2) -> int:
    """Aurora's adapter parameters on the tiny model's cross-attention (d=64, 2 layers × q,k,v,o)."""
    return (2 * d + slices + 1) * rank + sites * ((d if ice else 0) + (4 * d + 1 if gqt else 0))


def plan(quick: bool, rank: int | None = None) -> list[Spec]:
    rank = rank or int(DEMO_AURORA["rank"])
    lora_per_rank = 8 * (64 + 64)  # 8 targets of 64×64, r·(d_in + d_out) each
    matched = max(1, round(adapter_count(rank) / lora_per_rank))
    specs = [
        Spec("heads only", "heads"),
        Spec(f"aurora cp R={rank} +ICE/GQT", "aurora", {"rank": rank}),
        Spec("lora r=8", "lora", {"rank": 8}),
        Spec(f"lora r={matched} (Aurora's count)", "lora", {"rank": matched}),
        Spec("full fine-tuning", "full", lr=float(PRETRAIN["run"]["init_lr"])),
    ]
    sweep = [4] if quick else [r for r in (4, 16, 32, 64) if r != rank]
    specs += [Spec(f"aurora cp R={r} +ICE/GQT", "aurora", {"rank": r}, group="rank sweep") for r in sweep]
    ablation = (("no ICE/GQT", False, False), ("ICE only", True, False), ("GQT only", False, True))
    specs += [Spec(f"aurora cp R={rank} {label}", "aurora", {"rank": rank, "ice": ice, "gqt": gqt},
                   group="ICE/GQT ablation") for label, ice, gqt in (ablation[:1] if quick else ablation)]
    return specs


# -- report ------------------------------------------------------------------------------------------

def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for r in runs:
        row = rows.setdefault(r["method"], {"method": r["method"], "group": r["group"], "trainable": r["trainable"],
                                            "r1": [], "txt_r1": [], "img_r1": [], "r_mean": [], "seconds": []})
        row["r1"].append(r["metrics"].get("r1_mean", float("nan")))
        for key in ("txt_r1", "img_r1", "r_mean"):
            row[key].append(r["metrics"].get(key, float("nan")))
        row["seconds"].append(r["seconds"])
    return list(rows.values())


def table(rows: list[dict[str, Any]], before: dict[str, float] | None) -> str:
    def ms(values: list[float]) -> str:
        mean, std = H.mean_std(values)
        return f"{mean:.1f} ± {std:.1f}"

    lines = []
    if before:
        lines.append(["pre-trained, not adapted", "0", f"{before['r1_mean']:.1f}", f"{before.get('txt_r1', 0):.1f}",
                      f"{before.get('img_r1', 0):.1f}", f"{before.get('r_mean', 0):.1f}", "–", "–"])
    for row in rows:
        lines.append([row["method"], f"{row['trainable']:,}", ms(row["r1"]), ms(row["txt_r1"]), ms(row["img_r1"]),
                      ms(row["r_mean"]), str(len(row["r1"])), f"{statistics.median(row['seconds']):.0f}"])
    return H.markdown_table(["method", "trainable", "R@1 mean", "image→text R@1", "text→image R@1", "mean recall",
                             "seeds", "s/run"], lines)


def plot(rows: list[dict[str, Any]], before: dict[str, float] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"heads": "#888888", "aurora": "#1f77b4", "lora": "#ff7f0e", "full": "#d62728"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    for ax, key, label, ref in ((axes[0], "r1", "test R@1, mean of both directions (%)", "r1_mean"),
                                (axes[1], "r_mean", "test mean recall (R@1/5/10, both directions, %)", "r_mean")):
        sweep = sorted([r for r in rows if r["method"].startswith("aurora cp R=") and r["method"].endswith("+ICE/GQT")],
                       key=lambda r: r["trainable"])
        if len(sweep) > 1:
            ax.plot([r["trainable"] for r in sweep], [H.mean_std(r[key])[0] for r in sweep], color=colors["aurora"],
                    linewidth=0.8, alpha=0.6, label="Aurora rank sweep (+ICE/GQT)")
        for row in rows:
            kind = next((k for k in colors if row["method"].startswith(k)), "full")
            mean, std = H.mean_std(row[key])
            ablation = row["group"] == "ICE/GQT ablation"
            ax.errorbar(row["trainable"], mean, yerr=std, fmt="s" if ablation else "o", capsize=3,
                        markersize=4 if ablation else 5, color=colors[kind], alpha=0.5 if ablation else 1.0)
            if not ablation:  # the ablation's points sit on top of R=32's; the table has them
                name = row["method"].replace(" +ICE/GQT", "").replace(" (Aurora's count)", " (≈ Aurora)")
                ax.annotate(name.replace("aurora cp ", "Aurora "), (row["trainable"], mean),
                            textcoords="offset points", xytext=(4, 3), fontsize=6)
        if before and ref in before:
            ax.axhline(before[ref], color="black", linestyle=":", linewidth=0.8, label="before adaptation")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel(label, fontsize=8)
        ax.plot([], [], "s", color=colors["aurora"], alpha=0.5, label="Aurora R=32 ICE/GQT ablation")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Tiny BLIP adapted to the shifted domain: accuracy vs trainable parameters (mean ± std over seeds)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, fewer configurations")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the demo's (quick: 1)")
    parser.add_argument("--rank", type=int, default=None, help="Aurora's rank in the comparison (default: the demo's)")
    parser.add_argument("--n-test", type=int, default=None, help="test images (default: the demo's)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="pre-trained model cache (the demo's)")
    parser.add_argument("--work", type=Path, default=None, help="where runs are written (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=H.RESULTS)
    parser.add_argument("--name", default=None, help="result file stem (default learning or learning_quick)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    logging.getLogger("peft").setLevel(logging.ERROR)
    if not args.verbose:
        warnings.simplefilter("ignore")
        logging.basicConfig(level=logging.ERROR)  # a root handler first: LAVIS's basicConfig(INFO) is then a no-op
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    epochs = args.epochs or (1 if args.quick else int(ADAPT_RUN["max_epoch"]))
    name = args.name or ("learning_quick" if args.quick else "learning")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aurora-learning-")))
        work.mkdir(parents=True, exist_ok=True)
        print(f"== pre-trained tiny BLIP and shifted-domain data (work dir {work})", flush=True)
        n_test = args.n_test
        setup = prepare(work, args.cache_dir, epochs, n_test, args.verbose)
        before = evaluate_pretrained(setup, args.verbose)
        print(f"  before adaptation: R@1 mean {before['r1_mean']:.1f}", flush=True)
        runs = []
        specs = plan(args.quick, args.rank)
        for seed in seeds:  # seed-major: a partial run still covers every method
            for spec in specs:
                result = run(setup, spec, seed, len(runs), args.verbose)
                runs.append(result)
                print(f"  seed {seed} {spec.name:<34} trainable {result['trainable']:>8,}  "
                      f"R@1 mean {result['metrics']['r1_mean']:5.1f}  ({result['seconds']:.0f} s)", flush=True)
    rows = summarise(runs)
    results = {"settings": {"seeds": seeds, "epochs": epochs, "rank": args.rank, "quick": args.quick,
                            "data": {**ADAPT_DATA, **({"n_test": n_test} if n_test else {})},
                            "run": {**ADAPT_RUN, "max_epoch": epochs, "valid_splits": []},
                            "pretrained": str(setup.pretrained.checkpoint.name)},
               "machine": H.machine(), "before": before, "runs": runs, "rows": rows,
               "wall_s": time.perf_counter() - started}
    report = render(results)
    print(report)
    (args.out / f"{name}.md").write_text(report + "\n")
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(rows, before, args.out / f"{name}_accuracy_vs_params.png")
    return results


def render(results: dict[str, Any]) -> str:
    s = results["settings"]
    rows = results["rows"]
    parts = [f"Tiny BLIP retrieval (pre-trained on the source domain) adapted to the shifted domain: "
             f"{s['epochs']} epoch(s), seeds {s['seeds']}, {s['data']['n_train']} training / {s['data']['n_test']} "
             f"test images; R@1 in % on the shifted test split after the last epoch (mean ± std over seeds); "
             f"wall {results['wall_s']:.0f} s"]
    for group in ("methods", "rank sweep", "ICE/GQT ablation"):
        chosen = [r for r in rows if r["group"] == group]
        if group != "methods":  # the default configuration belongs to every comparison
            default = next((r for r in rows if r["group"] == "methods" and r["method"].startswith("aurora")), None)
            chosen = ([default] if default else []) + chosen
            chosen.sort(key=lambda r: r["trainable"])
        parts += [f"\n### {group}\n", table(chosen, results["before"] if group == "methods" else None)]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
