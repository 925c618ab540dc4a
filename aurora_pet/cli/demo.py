"""``aurora-pet demo``: the embedded demo end to end on the CPU (generated data, tiny BLIP, no download).

``run`` is the subcommand's entry point and the only place the demo sets process-wide state (torch
threads, warnings filters). ``run_demo`` runs the steps of ``aurora_pet.demo`` and prints the demo's
report; LAVIS's own output goes to log files next to the results.
"""

from __future__ import annotations

import argparse
import contextlib
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

METRIC_LABELS = (("txt_r1", "image→text R@1"), ("txt_r5", "image→text R@5"), ("img_r1", "text→image R@1"),
                 ("img_r5", "text→image R@5"), ("r_mean", "mean recall"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"),
                        help="where data, recipe, run, adapter and plot go (an earlier demo's output there "
                             "is replaced; default: outputs/demo)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the pre-trained tiny BLIP is cached (default: $AURORA_PET_CACHE or "
                             "~/.cache/aurora-pet)")
    parser.add_argument("--epochs", type=_positive_int, default=None,
                        help="adaptation epochs, at least 1 (default: the demo's)")
    parser.add_argument("--verbose", action="store_true", help="show LAVIS's logging and progress lines")


def run(args: argparse.Namespace) -> int:
    """The subcommand's entry point. One intra-op thread: the tiny model gains nothing from more, and on a
    busy machine more threads than free cores slow every step down many times. Unless ``--verbose``, the
    known harmless warnings of LAVIS and its dependencies are not shown."""
    import torch

    from ..errors import AuroraError

    torch.set_num_threads(1)
    if not args.verbose:
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
    try:
        run_demo(args.output_dir, args.cache_dir, epochs=args.epochs, verbose=args.verbose)
    except (AuroraError, FileNotFoundError, FileExistsError) as error:
        print(f"aurora-pet demo: error: {error}", file=sys.stderr)
        return 2
    return 0


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


def run_demo(output_dir: str | Path, cache_dir: str | Path | None = None, *, epochs: int | None = None,
             verbose: bool = False, print_fn: Callable[..., None] | None = None) -> DemoResult:
    """The whole demo; writes data, recipes, runs and the adapter under ``output_dir``.

    ``print_fn`` receives each line of the demo's own report (default: this process's stdout, also
    while LAVIS's output goes to the log files)."""
    from ..demo.pretrained import default_cache_dir, pretrained_tiny_blip
    from ..demo.recipe import ADAPT_DATA, ARCH, demo_recipe, write_demo_data
    from ..report import format_report
    from ..training.data import write_recipe
    from ..training.evaluate import evaluate
    from ..training.trainer import train

    if print_fn is None:
        stream = sys.stdout

        def print_fn(*args: Any) -> None:
            print(*args, file=stream, flush=True)

    start = time.time()
    out = _fresh_output_dir(output_dir)
    print_fn("aurora-pet demo: a tiny BLIP (LAVIS BlipRetrieval) adapted with Aurora to a shifted domain")
    print_fn(f"[1/4] pre-trained tiny BLIP on the source domain (cache: {Path(cache_dir or default_cache_dir())})")
    with _lavis_output(None, verbose):
        pretrained = pretrained_tiny_blip(ARCH, cache_dir, quiet=not verbose)
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
    run = {"max_epoch": epochs} if epochs is not None else {}
    recipe = write_recipe(out / "recipe.yaml", demo_recipe(written, out / "run", pretrained=pretrained, run=run))
    print_fn("[3/4] before adaptation: LAVIS retrieval evaluation on the shifted test split")
    quiet_options = [] if verbose else ["run.progress=False"]
    with _lavis_output(out / "before.log", verbose):
        before = evaluate(recipe, [f"run.output_dir={out / 'before'}", *quiet_options], quiet=not verbose)
    print_fn("      " + _metrics_line(before))
    print_fn(f"[4/4] Aurora adaptation on the shifted training split: {recipe}")
    print_fn(format_report(_adapter_report(pretrained, recipe)))

    def epoch_done(row: dict[str, Any], total: int) -> None:
        print_fn(f"      epoch {row['epoch'] + 1}/{total}: loss {row.get('train_loss', float('nan')):.3f}, "
                 f"val {_metrics_line({k[4:]: v for k, v in row.items() if k.startswith('val_')}, short=True)}")

    with _lavis_output(out / "train.log", verbose):
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
def _lavis_output(log_file: Path | None, verbose: bool) -> Iterator[None]:
    """Where LAVIS's prints and log records go while it runs. With ``verbose``: the console, as LAVIS sets
    it up. Otherwise prints go to ``log_file`` (without one: the console) and only warnings and errors are
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
