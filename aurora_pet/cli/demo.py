"""``aurora-pet demo [--family lavis|hf]``: the embedded demo end to end on the CPU (generated data, tiny BLIP,
no download).

``run`` is the subcommand's entry point and the only place the demo sets process-wide state (torch
threads, warnings filters, transformers' progress bars). ``run_demo`` runs the steps of ``aurora_pet.demo``
for one family and prints the demo's report, the same report for both; the runners' own output goes to log
files next to the results.

Each family runs in its own environment (LAVIS pins transformers<4.27, the hf family needs transformers 5):
``make demo`` runs ``--family lavis`` in ``.venv``, ``make demo-hf`` runs ``--family hf`` in ``.venv-hf``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import logging
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..demo.pretrained import PretrainedTiny

FAMILIES = ("lavis", "hf")
# family: (its environment, the make target that builds it and runs the demo there, its pip extra)
ENVIRONMENTS = {"lavis": ("the LAVIS environment (.venv: salesforce-lavis, transformers<4.27)", "make demo", "lavis"),
                "hf": ("the transformers 5 environment (.venv-hf)", "make demo-hf", "hf")}
TITLES = {"lavis": "a tiny BLIP (LAVIS BlipRetrieval)", "hf": "a tiny BLIP (transformers BlipForImageTextRetrieval)"}
PRESETS = ("cross-attention", "text-attention", "reference")
# Why the demo's default preset is not the one that adapts this shift best (bench.learning, BENCHMARKS.md
# Part B): the shift is in the images, and only `reference` adapts the ViT.
PRESET_NOTES = {
    "cross-attention": "preset cross-attention (the paper's: q, k, v, o of the text cross-attention). This demo's "
                       "shift is visual (dark noisy backgrounds, new colour/shape pairs), which text-side adapters "
                       "can only compensate for: on it, `--preset reference` (the public code's targets, ViT "
                       "qkv/proj/fc1/fc2 + text q, k, v) recovers more of full fine-tuning's gain (measured on the "
                       "LAVIS model by bench.learning: BENCHMARKS.md Part B)",
    "text-attention": "preset text-attention (q, k, v, o of the text self- and cross-attention). This demo's shift "
                      "is visual: on it, `--preset reference` (it also adapts the ViT) recovers more of full "
                      "fine-tuning's gain (measured on the LAVIS model by bench.learning: BENCHMARKS.md Part B)",
    "reference": "preset reference (the public code's targets: ViT qkv/proj/fc1/fc2 + text q, k, v): of the three "
                 "presets, the one that adapts this demo's visual shift best (measured on the LAVIS model by "
                 "bench.learning: BENCHMARKS.md Part B)",
}
METRIC_LABELS = (("txt_r1", "image→text R@1"), ("txt_r5", "image→text R@5"), ("img_r1", "text→image R@1"),
                 ("img_r5", "text→image R@5"), ("r_mean", "mean recall"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's options (``aurora_pet.cli`` calls this for ``aurora-pet demo`` only)."""
    parser.add_argument("--family", choices=FAMILIES, default="lavis",
                        help="the model family: lavis (LAVIS BlipRetrieval, in .venv: make demo; the default) or hf "
                             "(transformers BlipForImageTextRetrieval, in .venv-hf: make demo-hf)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"),
                        help="where data, recipe, run, adapter and plot go (an earlier demo's output there "
                             "is replaced; default: outputs/demo)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the pre-trained tiny BLIP is cached (default: $AURORA_PET_CACHE or "
                             "~/.cache/aurora-pet)")
    parser.add_argument("--epochs", type=_positive_int, default=None,
                        help="adaptation epochs, at least 1 (default: the demo's)")
    parser.add_argument("--preset", choices=PRESETS, default="cross-attention",
                        help="Aurora's targets (default cross-attention, the paper's; reference also adapts the "
                             "ViT, which this demo's visual shift rewards: see BENCHMARKS.md Part B)")
    parser.add_argument("--verbose", action="store_true",
                        help="show the runner's logging and progress lines (LAVIS's, or the hf runner's)")


def run(args: argparse.Namespace) -> int:
    """The subcommand's entry point. One intra-op thread: the tiny model gains nothing from more, and on a
    busy machine more threads than free cores slow every step down many times. Unless ``--verbose``, the
    known harmless warnings of LAVIS and its dependencies and transformers' progress bars are not shown.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options (``add_arguments``).

    Returns
    -------
    int
        The exit status: 0, or 2 after an error message (wrong environment, bad input).
    """
    problem = environment_problem(args.family)
    if problem is not None:
        print(f"aurora-pet demo: error: {problem}", file=sys.stderr)
        return 2
    import torch

    from ..errors import AuroraError

    torch.set_num_threads(1)
    if not args.verbose:
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if args.family == "hf":
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    try:
        run_demo(args.output_dir, args.cache_dir, family=args.family, epochs=args.epochs, preset=args.preset,
                 verbose=args.verbose)
    except (AuroraError, FileNotFoundError, FileExistsError) as error:
        print(f"aurora-pet demo: error: {error}", file=sys.stderr)
        return 2
    return 0


def environment_problem(family: str) -> str | None:
    """Why this Python cannot run the demo of ``family``, naming the environment and ``make`` target that
    can; None when it can. Looks at installed distributions only (nothing is imported), so the answer comes
    before LAVIS's or transformers' import errors would.

    Parameters
    ----------
    family : str
        "lavis" or "hf".

    Returns
    -------
    str or None
        The problem, or None.
    """
    if family not in FAMILIES:
        return f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}"
    where, target, extra = ENVIRONMENTS[family]
    advice = f"run `{target}` (or use an environment made with pip install 'aurora-pet[{extra}]')"
    try:
        transformers = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        transformers = None
    if family == "lavis" and importlib.util.find_spec("lavis") is None:
        return (f"--family lavis runs in {where}, and this Python ({sys.prefix}) has no LAVIS "
                f"(salesforce-lavis); {advice}")
    if family == "hf" and (transformers is None or int(transformers.split(".")[0]) < 5):
        found = f"transformers {transformers}" if transformers else "no transformers"
        return f"--family hf runs in {where}, and this Python ({sys.prefix}) has {found}; {advice}"
    if family == "hf" and importlib.util.find_spec("accelerate") is None:  # the hf recipe runner's
        return f"--family hf runs in {where}, and this Python ({sys.prefix}) has no accelerate; {advice}"
    return None


@dataclass
class DemoResult:
    """What a demo run measured and wrote (for tests and callers that go on from it)."""

    before: dict[str, float]
    after: dict[str, float]
    adapter: Path | None
    plot: Path | None
    output_dir: Path
    pretrained: PretrainedTiny
    parameter_report: dict[str, Any] | None
    seconds: float
    family: str = "lavis"


def run_demo(output_dir: str | Path, cache_dir: str | Path | None = None, *, family: str = "lavis",
             epochs: int | None = None, preset: str = "cross-attention", verbose: bool = False,
             print_fn: Callable[..., None] | None = None) -> DemoResult:
    """The whole demo of one family; writes data, recipes, runs and the adapter under ``output_dir``.

    Parameters
    ----------
    output_dir : str or Path
        Where everything goes; an earlier demo's output there is replaced, anything else refused.
    cache_dir : str, Path or None
        The pre-trained model's cache (default: ``$AURORA_PET_CACHE`` or ``~/.cache/aurora-pet``).
    family : str
        "lavis" (LAVIS ``BlipRetrieval``, LAVIS's runner) or "hf" (transformers' ``BlipForImageTextRetrieval``,
        the hf recipe runner); each needs its environment (``environment_problem``).
    epochs : int or None
        Adaptation epochs instead of the demo's.
    preset : str
        Aurora's targets: "cross-attention" (the default, the paper's), "text-attention" or "reference".
    verbose : bool
        Show the runner's own output instead of writing it to log files.
    print_fn : callable or None
        Receives each line of the demo's own report (default: this process's stdout, also while the
        runner's output goes to the log files).

    Returns
    -------
    DemoResult
        Before/after metrics of the shifted test split, the adapter, the plot and the parameter report.

    Raises
    ------
    ValueError
        An unknown ``family`` or ``preset``.
    ImportError
        This Python lacks the family's environment (the message names the one to use), before anything
        is written.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    problem = environment_problem(family)
    if problem is not None:
        raise ImportError(problem)
    from ..demo.pretrained import default_cache_dir

    if print_fn is None:
        stream = sys.stdout

        def print_fn(*args: Any) -> None:
            print(*args, file=stream, flush=True)

    start = time.time()
    out = _fresh_output_dir(output_dir)
    print_fn(f"aurora-pet demo: {TITLES[family]} adapted with Aurora to a shifted domain")
    print_fn(f"[1/4] pre-trained tiny BLIP on the source domain (cache: {Path(cache_dir or default_cache_dir())})")
    steps = _lavis_steps if family == "lavis" else _hf_steps
    pretrained, before, result, runner_log = steps(out, cache_dir, epochs, preset, verbose, print_fn)
    after = {k[len("test_"):]: v for k, v in (result.final or {}).items() if k.startswith("test_")}
    print_fn("\n" + _comparison(before, after))
    print_fn(f"\n{PRESET_NOTES[preset]}")
    print_fn(f"\nadapter: {result.weights_dir}")
    print_fn(f"plot:    {result.plot}")
    print_fn(f"metrics: {out / 'run' / 'metrics.csv'}  ({runner_log})")
    seconds = time.time() - start
    print_fn(f"done in {seconds:.0f} s")
    return DemoResult(before, after, result.weights_dir, result.plot, out, pretrained,
                      result.parameter_report, seconds, family)


def _lavis_steps(out: Path, cache_dir: str | Path | None, epochs: int | None, preset: str, verbose: bool,
                 print_fn: Callable[..., None]) -> tuple[PretrainedTiny, dict[str, float], Any, str]:
    """Steps 1-4 with LAVIS: its ``BlipRetrieval``, recipe, evaluation and runner. Returns the pre-trained
    entry, the metrics before, the training result and where the runner's output went."""
    from ..demo.pretrained import pretrained_tiny_blip
    from ..demo.recipe import ADAPT_DATA, ARCH, DEMO_AURORA, demo_recipe, write_demo_data
    from ..report import format_report
    from ..training.data import write_recipe
    from ..training.evaluate import evaluate
    from ..training.trainer import train

    with _runner_output(None, verbose):
        pretrained = pretrained_tiny_blip(ARCH, cache_dir, quiet=not verbose)
    _print_pretrained(pretrained, print_fn)
    written = _shifted_data(out, ADAPT_DATA, write_demo_data, print_fn)
    run = {"max_epoch": epochs} if epochs is not None else {}
    recipe = write_recipe(out / "recipe.yaml", demo_recipe(written, out / "run", pretrained=pretrained, run=run,
                                                             aurora={**DEMO_AURORA, "preset": preset}))
    print_fn("[3/4] before adaptation: LAVIS retrieval evaluation on the shifted test split")
    quiet_options = [] if verbose else ["run.progress=False"]
    with _runner_output(out / "before.log", verbose):
        before = evaluate(recipe, [f"run.output_dir={out / 'before'}", *quiet_options], quiet=not verbose)
    print_fn("      " + _metrics_line(before))
    print_fn(f"[4/4] Aurora adaptation on the shifted training split: {recipe}")
    print_fn(format_report(_adapter_report(pretrained, recipe)))
    with _runner_output(out / "train.log", verbose):
        result = train(recipe, quiet_options, quiet=True, epoch_callback=_epoch_printer(print_fn))
    return pretrained, before, result, f"LAVIS's output: {out / 'train.log'}"


def _hf_steps(out: Path, cache_dir: str | Path | None, epochs: int | None, preset: str, verbose: bool,
              print_fn: Callable[..., None]) -> tuple[PretrainedTiny, dict[str, float], Any, str]:
    """Steps 1-4 with transformers: ``BlipForImageTextRetrieval`` written as the recipe's ``model.pretrained``,
    a ``family: hf`` recipe, its evaluation and runner (``hf_train.train``). Returns as ``_lavis_steps``."""
    from ..demo.hf import HF_ADAPT_DATA, HF_ARCH, HF_DEMO_AURORA, hf_demo_recipe
    from ..demo.pretrained import pretrained_tiny_blip
    from ..demo.recipe import write_demo_data
    from ..model import get_aurora_model
    from ..report import format_report
    from ..training.data import write_recipe
    from ..training.hf_recipe import load_hf_recipe
    from ..training.hf_train import train

    with _runner_output(None, verbose):
        pretrained = pretrained_tiny_blip(HF_ARCH, cache_dir, quiet=not verbose)
    _print_pretrained(pretrained, print_fn)
    model_dir = pretrained.save_pretrained(out / "pretrained")
    written = _shifted_data(out, HF_ADAPT_DATA, write_demo_data, print_fn)
    run = {"max_epoch": epochs} if epochs is not None else {}
    if verbose:
        run["progress"] = True
    recipe = write_recipe(out / "recipe.yaml", hf_demo_recipe(written, out / "run", pretrained_dir=model_dir, run=run,
                                                                aurora={**HF_DEMO_AURORA, "preset": preset}))
    print_fn("[3/4] before adaptation: hf recipe evaluation (ITC, ITM re-ranking) on the shifted test split")
    with _runner_output(out / "before.log", verbose):
        evaluated = train(recipe, [f"run.output_dir={out / 'before'}", "run.evaluate=True", "run.valid_splits=[]"],
                          quiet=True)
    before = {k[len("test_"):]: v for k, v in (evaluated.final or {}).items() if k.startswith("test_")}
    print_fn("      " + _metrics_line(before))
    print_fn(f"[4/4] Aurora adaptation on the shifted training split: {recipe}")
    print_fn(format_report(get_aurora_model(pretrained.build(), load_hf_recipe(recipe).aurora).parameter_report()))
    with _runner_output(out / "train.log", verbose):
        result = train(recipe, quiet=True, epoch_callback=_epoch_printer(print_fn))
    return pretrained, before, result, f"the runner's output: {out / 'train.log'}"


def _print_pretrained(pretrained: PretrainedTiny, print_fn: Callable[..., None]) -> None:
    """Step 1's report: where the source-domain model came from and how well it does there."""
    how = {"shipped": "shipped with the package", "cache": "loaded from the cache"}.get(
        pretrained.source, f"pre-trained now in {pretrained.seconds:.0f} s and cached")
    m = pretrained.metrics
    print_fn(f"      {how}: {pretrained.checkpoint}")
    if m:
        print_fn(f"      source-domain test: image→text R@1 {m.get('test_txt_r1', 0):.1f}, "
                 f"text→image R@1 {m.get('test_img_r1', 0):.1f}")


def _shifted_data(out: Path, sizes: Mapping[str, Any], write: Callable[..., dict[str, Any]],
                  print_fn: Callable[..., None]) -> dict[str, Any]:
    """Step 2: the shifted domain's files under ``out/data``, reported."""
    print_fn("[2/4] shifted-domain data in Flickr30k's annotation format")
    written = write(out / "data", "shifted", **sizes)
    print_fn(f"      {written['images']}  ({sizes['n_train']} train / {sizes['n_val']} val / "
             f"{sizes['n_test']} test images, 5 captions each)")
    return written


def _epoch_printer(print_fn: Callable[..., None]) -> Callable[[dict[str, Any], int], None]:
    """The runners' ``epoch_callback``: one line per epoch (loss, validation R@1/R@5, mean recall)."""
    def epoch_done(row: dict[str, Any], total: int) -> None:
        print_fn(f"      epoch {row['epoch'] + 1}/{total}: loss {row.get('train_loss', float('nan')):.3f}, "
                 f"val {_metrics_line({k[4:]: v for k, v in row.items() if k.startswith('val_')}, short=True)}")

    return epoch_done


def _positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _fresh_output_dir(output_dir: str | Path) -> Path:
    """``output_dir``, empty and marked as the demo's; an earlier demo's output there is replaced, anything
    else is refused (the demo never deletes a directory it did not write)."""
    out = Path(output_dir).absolute()
    marker = out / ".aurora-pet-demo"
    if out.exists() and any(out.iterdir()):
        if not marker.is_file():
            raise FileExistsError(f"{out} exists and is not an earlier demo's output; choose another --output-dir")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("written by aurora-pet demo; the next demo run replaces this directory\n")
    return out


@contextlib.contextmanager
def _runner_output(log_file: Path | None, verbose: bool) -> Iterator[None]:
    """Where a runner's (LAVIS's, the hf runner's) prints and log records go while it runs. With
    ``verbose``: the console, as the runner sets it up. Otherwise prints go to ``log_file`` (without one: the console) and only warnings and errors are
    logged, to ``log_file`` or stderr."""
    if verbose:
        yield
        return
    root = logging.getLogger()
    with contextlib.ExitStack() as stack:
        stream = sys.stderr
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            stream = stack.enter_context(open(log_file, "a"))
            stack.enter_context(contextlib.redirect_stdout(stream))
        # LAVIS's setup_logger() is logging.basicConfig(level=INFO): a no-op once the root logger has a handler
        if not root.handlers:
            handler = logging.StreamHandler(stream)
            handler.setLevel(logging.WARNING)
            root.addHandler(handler)
            stack.callback(root.removeHandler, handler)
        yield


def _adapter_report(pretrained: PretrainedTiny, recipe: Path) -> dict[str, Any]:
    """The parameter report of the demo's adapter (the table ``train`` would print)."""
    from ..families.lavis.wrap import wrap_blip
    from ..training.recipe import load_recipe

    return wrap_blip(pretrained.build(), load_recipe(recipe).aurora).parameter_report()


def _metrics_line(metrics: Mapping[str, float], short: bool = False) -> str:
    labels = METRIC_LABELS[::2] if short else METRIC_LABELS
    return ", ".join(f"{label} {metrics[key]:.1f}" for key, label in labels if key in metrics)


def _comparison(before: Mapping[str, float], after: Mapping[str, float]) -> str:
    lines = [f"{'shifted test split':<18}{'before':>10}{'after':>10}"]
    lines += [f"{label:<18}{before.get(key, float('nan')):>10.1f}{after.get(key, float('nan')):>10.1f}"
              for key, label in METRIC_LABELS]
    return "\n".join(lines)
