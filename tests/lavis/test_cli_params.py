"""`aurora-pet params` on the real BLIP-base architectures (random weights, no download).

The base models are built once for the module: in-process calls get them through `params.build_model`.
One call goes through the installed console script, which builds for itself.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aurora_pet.cli import main
from aurora_pet.cli import params

BUILD = params.build_model
D = 768
VIT, BERT = 86_090_496, 137_258_496  # BLIP-base ViT-B/16 at 384 px and BERT-base with cross-attention
PROJECTIONS = 2 * (D * 256 + 256)
RETRIEVAL_HEADS = PROJECTIONS + D * 2 + 2  # vision_proj, text_proj, itm_head
RETRIEVAL_BASE = VIT + BERT + RETRIEVAL_HEADS + 1  # + temp; the momentum copies are not counted
CROSS_ATTENTION = ["--preset", "cross-attention", "--rank", "64"]


@pytest.fixture(scope="module")
def build():
    """`params.build_model` with one model per (family, arch, size) for the whole module."""
    cache = {}

    def cached(family: str, arch: str, size: str):
        if (family, arch, size) not in cache:
            cache[family, arch, size] = BUILD(family, arch, size)
        return cache[family, arch, size]

    return cached


@pytest.fixture
def cli(build, monkeypatch, capsys):
    monkeypatch.setattr(params, "build_model", build)

    def call(*argv: str) -> tuple[int, str, str]:
        code = main(["params", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return call


def as_json(cli, *argv: str) -> dict:
    code, out, _ = cli(*argv, "--json")
    assert code == 0
    return json.loads(out)


def row(report: dict, name: str) -> dict:
    return next(r for r in report["rows"] if r["name"] == name)


def test_retrieval_cross_attention_counts(cli):
    report = as_json(cli, "--arch", "blip_retrieval", *CROSS_ATTENTION, "--no-ice", "--no-gqt")
    assert report["num_slices"] == 48 and report["slice_size"] == D
    assert report["groups"] == {"factors": 101_440, "ice": 0, "gqt": 0, "heads": RETRIEVAL_HEADS}
    assert report["groups"]["factors"] == (2 * D + 48 + 1) * 64
    assert report["base"] == RETRIEVAL_BASE == 223_744_259
    assert report["base_excludes"] == ["visual_encoder_m", "text_encoder_m", "vision_proj_m", "text_proj_m"]
    assert report["base_excluded_parameters"] == VIT + BERT + PROJECTIONS
    assert row(report, "factors")["percent_of_base"] == pytest.approx(0.0453, abs=5e-5)
    assert report["comparisons"] == {"lora": {"rank": 8, "trainable": 8 * 2 * D * 48 + RETRIEVAL_HEADS},
                                     "full_finetuning": {"trainable": RETRIEVAL_BASE}}
    assert report["heads"] == ["itm_head", "vision_proj", "text_proj"]


def test_retrieval_with_ice_and_gqt(cli):
    report = as_json(cli, *CROSS_ATTENTION, "--lora-rank", "16")
    sites = 12  # one cross-attention per text layer
    assert report["groups"]["ice"] == sites * D and report["groups"]["gqt"] == sites * (4 * D + 1)
    assert report["trainable"] == 101_440 + sites * (5 * D + 1) + RETRIEVAL_HEADS
    assert report["comparisons"]["lora"]["trainable"] == 16 * 2 * D * 48 + RETRIEVAL_HEADS


def test_text_table(cli):
    code, out, err = cli(*CROSS_ATTENTION, "--no-ice", "--no-gqt")
    assert code == 0 and "101,440" in out and "223,744,259" in out
    assert "0.0453%" in out and "leaves out the momentum copies" in out and "LoRA r=8" in out
    assert "Building LAVIS blip_retrieval" in err  # progress goes to stderr, the table alone to stdout


def test_csv_parses(cli):
    code, out, _ = cli(*CROSS_ATTENTION, "--no-ice", "--no-gqt", "--csv")
    assert code == 0
    rows = {r["name"]: r for r in csv.DictReader(io.StringIO(out))}
    assert list(rows) == ["factors", "ice", "gqt", "heads", "total", "lora", "full_finetuning", "base"]
    assert int(rows["factors"]["parameters"]) == 101_440
    assert int(rows["total"]["parameters"]) == sum(int(rows[g]["parameters"]) for g in ("factors", "ice", "gqt", "heads"))
    assert float(rows["full_finetuning"]["percent_of_base"]) == 100.0


def test_vqa_cross_attention_counts(cli):
    report = as_json(cli, "--arch", "blip_vqa", *CROSS_ATTENTION, "--no-ice", "--no-gqt")
    assert report["num_slices"] == 96  # 12 encoder + 12 decoder layers × q, k, v, o
    assert report["groups"] == {"factors": (2 * D + 96 + 1) * 64, "ice": 0, "gqt": 0, "heads": 0}
    assert report["base_excludes"] == [] and report["model"] == {"family": "lavis", "arch": "blip_vqa", "size": "base"}


@pytest.mark.parametrize(("targets", "slices"), [
    ("crossattention.self.query,crossattention.self.key", 24),
    (r"text_encoder\.encoder\.layer\.(0|11)\.attention\.self\.query", 2),
])
def test_targets_instead_of_a_preset(cli, targets, slices):
    report = as_json(cli, "--targets", targets, "--rank", "8")
    assert report["num_slices"] == slices and report["groups"]["factors"] == (2 * D + slices + 1) * 8


def test_parse_targets():
    assert params.parse_targets("query,key") == ["query", "key"]
    assert params.parse_targets(r"layer\.\d+\.query") == r"layer\.\d+\.query"


@pytest.mark.parametrize(("argv", "message"), [
    (["--preset", "cross-atention"], r"unknown preset 'blip_retrieval/cross-atention' \(did you mean"),
    (["--preset", "blip_vqa/reference"], r"preset 'blip_vqa/reference' is for blip_vqa, not --arch blip_retrieval"),
    (["--targets", "nothing.here"], r"matched no nn.Linear module"),
    (["--rank", "0"], r"rank must be a positive integer"),
    (["--rank", "1000"], r"rank 1000 exceeds the slice size d=768"),
    (["--lora-rank", "0"], r"--lora-rank must be a positive integer"),
    (["--arch", "blip2"], r"--arch blip2 is not a lavis architecture"),
    (["--family", "hf"], r"the hf family needs transformers>=5"),
])
def test_bad_arguments_are_clear_errors(cli, argv, message):
    code, out, err = cli(*argv)
    assert code == 2 and out == ""
    assert err.splitlines()[-1].startswith("aurora-pet params: error: ")
    assert re.search(message, err), err


def test_console_script_entry_point():
    script = Path(sys.executable).with_name("aurora-pet")
    assert script.is_file(), f"console script not installed next to {sys.executable}"
    result = subprocess.run([str(script), "params", *CROSS_ATTENTION, "--no-ice", "--no-gqt", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    assert report["groups"]["factors"] == 101_440 and report["base"] == RETRIEVAL_BASE


@pytest.mark.parametrize("arch, image_arch", [("blip_video_retrieval", "blip_retrieval"), ("blip_video_qa", "blip_vqa")])
def test_video_architectures_count_the_frame_embedding(cli, arch, image_arch):
    """A video architecture trains what its image architecture's preset trains plus τ (8 frames × width)."""
    video = as_json(cli, "--arch", arch, "--size", "tiny", *CROSS_ATTENTION)
    image = as_json(cli, "--arch", image_arch, "--size", "tiny", *CROSS_ATTENTION)
    assert video["model"]["arch"] == arch and "frame_embedding" in video["config"]["modules_to_save"]
    assert video["trainable"] == image["trainable"] + 8 * 64
    assert row(video, "factors")["parameters"] == row(image, "factors")["parameters"]
    code, _, err = cli("--family", "hf", "--arch", arch)
    assert code == 2 and "LAVIS video architecture; use --family lavis" in err
