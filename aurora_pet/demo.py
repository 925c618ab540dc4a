"""The embedded demo: a tiny BLIP learns a generated shapes world, then Aurora adapts it to a shifted one.

1. Data (``aurora_pet.data.synthetic``) in Flickr30k's real annotation format: a ``source`` domain
   (light background, one set of colour/shape pairs, "on the left") and a ``shifted`` one (dark noisy
   background, the other pairs, "at the left", more shapes per image).
2. ``pretrained_tiny_blip``: a tiny LAVIS ``BlipRetrieval`` trained in full on the source domain with
   LAVIS's runner and BLIP's own losses (ITC with momentum distillation + ITM with hard negatives),
   through the same ``aurora_pet.training.train`` as the recipes (48 epochs, about 6 minutes on 2 CPU
   cores). The result of the default settings ships with the package (``aurora_pet/assets``, 2 MB);
   other settings are trained once and cached, keyed by a hash of every setting.
3. Evaluation on the shifted test split before adaptation (the Aurora-wrapped model at initialisation
   is exactly the pre-trained model), Aurora adaptation (cross-attention preset + ITM/projection heads)
   on the shifted training split, and evaluation after it: LAVIS's retrieval task, R@1/5/10 in both
   directions with ITM re-ranking.

Reusable pieces (also for benchmarks): ``pretrained_tiny_blip``, ``write_demo_data``, ``demo_recipe``,
``evaluate`` (a recipe, through the runner), ``evaluate_model`` (an in-memory model), ``run_demo``.
The demo runs with one intra-op thread (``threads``): the tiny model gains nothing from more, and on a
busy machine more threads than free cores slow every step down many times.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARCH = "blip_retrieval"
IMAGE_SIZE = 32
# The tiny model's settings on top of build_blip(size="tiny"): what the recipe's model section says.
TINY_MODEL: dict[str, Any] = {"size": "tiny", "image_size": IMAGE_SIZE, "queue_size": 64, "vit_grad_ckpt": False}
# Source-domain pre-training (full fine-tuning from a random initialisation).
PRETRAIN: dict[str, Any] = {
    "data": {"n_train": 256, "n_val": 32, "n_test": 32, "seed": 0},
    "run": {"init_lr": 5e-4, "max_epoch": 48, "batch_size_train": 32, "batch_size_eval": 64, "k_test": 8,
            "valid_splits": [], "test_splits": ["test"], "seed": 42, "log_freq": 1000},
    "init_std": 0.2,  # ViT linear weights; see _initial_checkpoint
    "version": 1,
}
# Shifted-domain adaptation with Aurora (tuned for a clear gain in about a minute and a half on 2 cores).
ADAPT_DATA: dict[str, Any] = {"n_train": 256, "n_val": 32, "n_test": 64, "seed": 1}
ADAPT_RUN: dict[str, Any] = {"init_lr": 4e-3, "max_epoch": 12, "batch_size_train": 16, "batch_size_eval": 64,
                             "k_test": 32, "valid_splits": ["val"], "test_splits": ["test"], "seed": 42,
                             "log_freq": 1000}
# The tiny model is 64 wide: rank 64 = d (the method's R=64 on BLIP-base is R = d/12).
DEMO_AURORA: dict[str, Any] = {"preset": "cross-attention", "rank": 64, "core": "cp", "ice": True, "gqt": True,
                               "modules_to_save": ["itm_head", "vision_proj", "text_proj"], "scale": 1.0,
                               "dropout": 0.0}


def default_cache_dir() -> Path:
    return Path(os.environ.get("AURORA_PET_CACHE", Path.home() / ".cache" / "aurora-pet"))


# -- data --------------------------------------------------------------------------------------------

def write_demo_data(root: str | Path, domain: str = "shifted", *, n_train: int = 128, n_val: int = 32,
                    n_test: int = 32, seed: int = 0, image_size: int = IMAGE_SIZE) -> dict[str, Any]:
    """Flickr30k-format retrieval data of one domain under ``root/<domain>`` (see ``write_retrieval_dataset``)."""
    from .data import write_retrieval_dataset

    return write_retrieval_dataset(Path(root) / domain, style="flickr30k", domain=domain, n_train=n_train,
                                   n_val=n_val, n_test=n_test, image_size=image_size, seed=seed)


def demo_recipe(written: Mapping[str, Any], output_dir: str | Path, *, pretrained: "PretrainedTiny | None",
                aurora: Mapping[str, Any] | None = DEMO_AURORA, run: Mapping[str, Any] | None = None,
                model: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The recipe (dict) the demo trains: tiny BLIP retrieval on ``written``, CPU, one process, loading
    ``pretrained`` (None: random weights). Write it with ``aurora_pet.training.write_recipe``."""
    from .training import generated_recipe

    settings = {**TINY_MODEL, **(pretrained.model if pretrained else {}), **(model or {})}
    settings["pretrained"] = str(pretrained.checkpoint) if pretrained else settings.get("pretrained")
    return generated_recipe(written, output_dir=output_dir, image_size=int(settings["image_size"]),
                            model=settings, run={**ADAPT_RUN, **(run or {})},
                            aurora=dict(aurora) if aurora is not None else None)


# -- the pre-trained tiny model ----------------------------------------------------------------------

@dataclass
class PretrainedTiny:
    """A tiny BLIP pre-trained on the source domain: ``checkpoint`` (full state dict, safetensors) and the
    recipe ``model`` settings that rebuild its architecture; ``metrics`` are its source-domain test results;
    ``source`` says where it came from: "shipped" (package data), "cache" or "trained" (just now)."""

    arch: str
    checkpoint: Path
    model: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    source: str = "cache"

    def build(self):
        """The LAVIS model with these weights (strict loading)."""
        from .families.lavis.build import ARCHITECTURES, build_blip

        settings = {k: v for k, v in self.model.items() if k not in ("size", "pretrained")}
        return build_blip(self.arch, ARCHITECTURES[self.arch][0], size=self.model.get("size", "tiny"),
                          checkpoint=self.checkpoint, **settings)


ASSETS = Path(__file__).with_name("assets")


def pretrain_settings(epochs: int | None = None) -> dict[str, Any]:
    """``PRETRAIN`` with another number of epochs (a separate cache entry)."""
    settings = json.loads(json.dumps(PRETRAIN))
    if epochs is not None:
        settings["run"]["max_epoch"] = int(epochs)
    return settings


def _settings_hash(arch: str, pretrain: Mapping[str, Any]) -> str:
    payload = json.dumps({"arch": arch, "model": TINY_MODEL, "pretrain": pretrain}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _load_entry(arch: str, directory: Path, name: str, source: str) -> PretrainedTiny | None:
    meta_file, weights = directory / f"{name}.json", directory / f"{name}.safetensors"
    if not (meta_file.is_file() and weights.is_file()):
        return None
    meta = json.loads(meta_file.read_text())
    return PretrainedTiny(arch, weights, meta["model"], meta["metrics"], meta.get("seconds", 0.0), source)


def pretrained_tiny_blip(arch: str = ARCH, cache_dir: str | Path | None = None, *, force: bool = False,
                         epochs: int | None = None, threads: int | None = 1, verbose: bool = False) -> PretrainedTiny:
    """The source-domain tiny BLIP for the demo and benchmarks.

    Looked up, in order: ``cache_dir`` (default ``$AURORA_PET_CACHE`` or ``~/.cache/aurora-pet``), then
    the weights shipped with the package (``aurora_pet/assets``, made by this function with the default
    settings); otherwise pre-trained from scratch (a few minutes on 2 CPU cores) with
    ``aurora_pet.training.train`` and cached. ``force`` pre-trains again; ``epochs`` overrides the number
    of pre-training epochs (another cache entry). Entries are keyed by a hash of every setting."""
    if arch != ARCH:
        raise ValueError(f"pretrained_tiny_blip supports {ARCH!r} only, got {arch!r}")
    pretrain = pretrain_settings(epochs)
    name = f"tiny-{arch}-{_settings_hash(arch, pretrain)}"
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not force:
        found = _load_entry(arch, cache, name, "cache") or _load_entry(arch, ASSETS, name, "shipped")
        if found is not None:
            return found
    start = time.time()
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".pretrain-", dir=cache))
    try:
        written = write_demo_data(work / "data", "source", **pretrain["data"])
        init = _initial_checkpoint(arch, work / "init.safetensors", pretrain)
        recipe = demo_recipe(written, work / "run", pretrained=PretrainedTiny(arch, init, dict(TINY_MODEL)),
                             aurora=None, run=pretrain["run"])
        from .training import train, write_recipe

        with _quiet(not verbose), torch_threads(threads):
            result = train(write_recipe(work / "pretrain.yaml", recipe), quiet=not verbose)
        metrics = {k: v for k, v in (result.final or {}).items() if k != "epoch"}
        seconds = time.time() - start
        _save_full(result.model, work / f"{name}.safetensors")
        (work / f"{name}.json").write_text(json.dumps(
            {"arch": arch, "model": TINY_MODEL, "pretrain": pretrain, "metrics": metrics, "seconds": seconds},
            indent=2) + "\n")
        for suffix in (".safetensors", ".json"):  # weights first: an entry counts once its .json exists
            os.replace(work / f"{name}{suffix}", cache / f"{name}{suffix}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return PretrainedTiny(arch, cache / f"{name}.safetensors", dict(TINY_MODEL), metrics, seconds, "trained")


def ship(pretrained: PretrainedTiny, assets: Path = ASSETS) -> Path:
    """Copy a pre-trained entry into the package's assets (what the maintainers ship)."""
    assets.mkdir(parents=True, exist_ok=True)
    stem = pretrained.checkpoint.stem
    shutil.copy2(pretrained.checkpoint, assets / f"{stem}.safetensors")
    shutil.copy2(pretrained.checkpoint.with_suffix(".json"), assets / f"{stem}.json")
    return assets / f"{stem}.safetensors"


def _initial_checkpoint(arch: str, path: Path, pretrain: Mapping[str, Any]) -> Path:
    """The random initialisation pre-training starts from, as a checkpoint file.

    LAVIS initialises ViT linears with std 0.02, which for a from-scratch 64-wide ViT leaves the class
    token almost independent of the image; contrastive training then collapses to a constant embedding.
    A larger std (``PRETRAIN["init_std"]``) lets the class token see the image from the first step.
    """
    import torch

    from .families.lavis.build import ARCHITECTURES, build_blip

    torch.manual_seed(int(pretrain["run"]["seed"]))
    settings = {k: v for k, v in TINY_MODEL.items() if k != "size"}
    model = build_blip(arch, ARCHITECTURES[arch][0], size="tiny", **settings)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.visual_encoder.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, pretrain["init_std"], generator=generator)
    model.copy_params()  # momentum encoders start as copies of the online ones
    _save_full(model, path)
    return path


def _save_full(model, path: Path) -> None:
    from safetensors.torch import save_model

    from .model import AuroraModel

    base = model.base_model if isinstance(model, AuroraModel) else model
    save_model(base, str(path))


# -- evaluation --------------------------------------------------------------------------------------

def evaluate(recipe_path: str | Path, options: Sequence[str] = (), *, split: str = "test",
             verbose: bool = False, log_file: Path | None = None) -> dict[str, float]:
    """LAVIS's evaluation of a recipe's model on ``split`` (no training): ``{"txt_r1": ..., ...}`` for
    retrieval, ``{"agg_metrics": ..., "other": ...}`` for VQA. ``aurora.adapter=<dir>`` in ``options``
    evaluates a saved adapter; without it the wrapped model at initialisation (= the base model)."""
    from .training import train

    options = [*options, "run.evaluate=True", "run.valid_splits=[]", f"run.test_splits=[{split}]"]
    with _quiet(not verbose, log_file):
        result = train(recipe_path, options, quiet=not verbose)
    prefix = f"{split}_"
    return {k[len(prefix):]: v for k, v in (result.final or {}).items() if k.startswith(prefix)}


def evaluate_model(model, written: Mapping[str, Any], *, split: str = "test", k_test: int = ADAPT_RUN["k_test"],
                   batch_size: int = 64, image_size: int = IMAGE_SIZE) -> dict[str, float]:
    """LAVIS's retrieval evaluation of an in-memory model (a LAVIS ``BlipRetrieval``, an ``AuroraModel``
    around one, or anything with its ``compute_sim_matrix``) on a split of ``written`` data: the same
    dataset builder, ``compute_sim_matrix`` (ITC, then ITM re-ranking of the top ``k_test``) and
    ``RetrievalTask`` metrics as a recipe's evaluation, without a runner."""
    import torch
    from lavis.common.config import Config
    from lavis.common.registry import registry
    from lavis.tasks.retrieval import RetrievalTask
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    from .training.data import dataset_section
    from .training.lavis_env import import_lavis_registry

    import_lavis_registry()
    section = dataset_section(written, image_size=image_size)
    name = written["builder"]
    cfg = Config.build_dataset_config(OmegaConf.create({"datasets": section})).datasets[name]
    dataset = registry.get_builder_class(name)(cfg).build_datasets()[split]
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    was_training = model.training
    model.eval()
    tmp = tempfile.mkdtemp(prefix="aurora-pet-eval-")
    previous = registry.mapping["paths"].pop("output_dir", None)
    registry.register_path("output_dir", tmp)  # RetrievalTask appends its metrics to evaluate.txt there
    try:
        with torch.no_grad():
            i2t, t2i = model.compute_sim_matrix(loader, task_cfg=OmegaConf.create({"k_test": k_test}))
            metrics = RetrievalTask._report_metrics(i2t, t2i, dataset.txt2img, dataset.img2txt)
    finally:
        registry.mapping["paths"].pop("output_dir", None)
        if previous is not None:
            registry.mapping["paths"]["output_dir"] = previous
        shutil.rmtree(tmp, ignore_errors=True)
        model.train(was_training)
    return {k: float(v) for k, v in metrics.items()}


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` intra-op threads (None: unchanged). The tiny model gains nothing from more
    than one, and on a busy machine more threads than free cores slow every step down many times."""
    import torch

    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _quiet(enabled: bool, log_file: Path | None = None) -> Iterator[None]:
    """Keep LAVIS's logging, per-iteration lines and known harmless warnings out of the demo's output;
    with ``log_file`` they are written there instead."""
    if not enabled:
        yield
        return
    root = logging.getLogger()
    level = root.level
    # LAVIS's setup_logger() is logging.basicConfig(level=INFO): a no-op once the root logger has a handler
    handler = logging.StreamHandler() if not root.handlers else None
    with contextlib.ExitStack() as stack:
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            stream = stack.enter_context(open(log_file, "a"))
            stack.enter_context(contextlib.redirect_stdout(stream))
            handler = logging.StreamHandler(stream) if not root.handlers else None
        if handler is not None:
            handler.setLevel(logging.WARNING)
            root.addHandler(handler)
        root.setLevel(logging.WARNING)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                warnings.simplefilter("ignore", FutureWarning)
                yield
        finally:
            root.setLevel(level)
            if handler is not None:
                root.removeHandler(handler)


# -- the demo ----------------------------------------------------------------------------------------

@dataclass
class DemoResult:
    before: dict[str, float]
    after: dict[str, float]
    adapter: Path | None
    plot: Path | None
    output_dir: Path
    pretrained: PretrainedTiny
    parameter_report: dict[str, Any] | None
    seconds: float


METRIC_LABELS = (("txt_r1", "image→text R@1"), ("txt_r5", "image→text R@5"), ("img_r1", "text→image R@1"),
                 ("img_r5", "text→image R@5"), ("r_mean", "mean recall"))


def run_demo(output_dir: str | Path, cache_dir: str | Path | None = None, *, epochs: int | None = None,
             threads: int | None = 1, verbose: bool = False, print_fn=None) -> DemoResult:
    """The whole demo; writes data, recipes, runs and the adapter under ``output_dir``.

    ``print_fn`` receives each line of the demo's own report (default: this process's stdout, also
    while LAVIS's output goes to the log files)."""
    if print_fn is None:
        stream = sys.stdout

        def print_fn(*args: Any) -> None:
            print(*args, file=stream, flush=True)

    with torch_threads(threads):
        return _run_demo(output_dir, cache_dir, epochs=epochs, verbose=verbose, print_fn=print_fn)


def _run_demo(output_dir, cache_dir, *, epochs, verbose, print_fn) -> DemoResult:
    from .report import format_report
    from .training import train, write_recipe

    start = time.time()
    out = Path(output_dir).absolute()
    marker = out / ".aurora-pet-demo"
    if out.exists() and any(out.iterdir()):
        if not marker.is_file():
            raise FileExistsError(f"{out} exists and is not an earlier demo's output; choose another --output-dir")
        shutil.rmtree(out)  # an earlier demo's output: replaced
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("written by aurora-pet demo; the next demo run replaces this directory\n")
    print_fn("aurora-pet demo: a tiny BLIP (LAVIS BlipRetrieval) adapted with Aurora to a shifted domain")
    print_fn(f"[1/4] pre-trained tiny BLIP on the source domain (cache: {Path(cache_dir or default_cache_dir())})")
    pretrained = pretrained_tiny_blip(ARCH, cache_dir, threads=None, verbose=verbose)
    how = {"shipped": "shipped with the package", "cache": "loaded from the cache"}.get(
        pretrained.source, f"pre-trained now in {pretrained.seconds:.0f} s and cached")
    m = pretrained.metrics
    print_fn(f"      {how}: {pretrained.checkpoint}")
    if m:
        print_fn(f"      source-domain test: image→text R@1 {m.get('test_txt_r1', 0):.1f}, "
                 f"text→image R@1 {m.get('test_img_r1', 0):.1f}")
    print_fn("[2/4] shifted-domain data in Flickr30k's annotation format")
    written = write_demo_data(out / "data", "shifted", **ADAPT_DATA)
    print_fn(f"      {written['images']}  ({ADAPT_DATA['n_train']} train / {ADAPT_DATA['n_val']} val / "
             f"{ADAPT_DATA['n_test']} test images, 5 captions each)")
    run = {"max_epoch": epochs} if epochs else {}
    recipe = write_recipe(out / "recipe.yaml", demo_recipe(written, out / "run", pretrained=pretrained, run=run))
    print_fn("[3/4] before adaptation: LAVIS retrieval evaluation on the shifted test split")
    quiet_options = [] if verbose else ["run.progress=False"]
    before = evaluate(recipe, [f"run.output_dir={out / 'before'}", *quiet_options], verbose=verbose,
                      log_file=out / "before.log")
    print_fn("      " + _metrics_line(before))
    print_fn(f"[4/4] Aurora adaptation on the shifted training split: {recipe}")
    print_fn(format_report(_wrapped_report(pretrained, recipe)))

    def epoch_done(row: dict[str, Any], total: int) -> None:
        print_fn(f"      epoch {row['epoch'] + 1}/{total}: loss {row.get('train_loss', float('nan')):.3f}, "
                 f"val {_metrics_line({k[4:]: v for k, v in row.items() if k.startswith('val_')}, short=True)}")

    with _quiet(not verbose, out / "train.log"):
        result = train(recipe, quiet_options, quiet=True, epoch_callback=epoch_done)
    after = {k[len("test_"):]: v for k, v in (result.final or {}).items() if k.startswith("test_")}
    print_fn("\n" + _comparison(before, after))
    print_fn(f"\nadapter: {result.weights_dir}")
    print_fn(f"plot:    {result.plot}")
    print_fn(f"metrics: {out / 'run' / 'metrics.csv'}  (LAVIS's output: {out / 'train.log'})")
    seconds = time.time() - start
    print_fn(f"done in {seconds:.0f} s")
    return DemoResult(before, after, result.weights_dir, result.plot, out, pretrained,
                      result.parameter_report, seconds)


def _metrics_line(metrics: Mapping[str, float], short: bool = False) -> str:
    labels = METRIC_LABELS[::2] if short else METRIC_LABELS
    return ", ".join(f"{label} {metrics[key]:.1f}" for key, label in labels if key in metrics)


def _wrapped_report(pretrained: PretrainedTiny, recipe: Path) -> dict[str, Any]:
    """The parameter report of the demo's adapter (the table ``train`` would print)."""
    from .families.lavis.wrap import wrap_blip
    from .training import load_recipe

    return wrap_blip(pretrained.build(), load_recipe(recipe).aurora).parameter_report()


def _comparison(before: Mapping[str, float], after: Mapping[str, float]) -> str:
    lines = [f"{'shifted test split':<18}{'before':>10}{'after':>10}"]
    lines += [f"{label:<18}{before.get(key, float('nan')):>10.1f}{after.get(key, float('nan')):>10.1f}"
              for key, label in METRIC_LABELS]
    return "\n".join(lines)
