"""`aurora-pet params --family hf` on the real transformers BLIP-base architectures (random weights)."""

from __future__ import annotations

import json
import re

import pytest

from aurora_pet.cli import main

D = 768


def params(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["params", "--family", "hf", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_blip_base_retrieval_cross_attention_matches_the_lavis_count(capsys):
    """The same preset on the same architecture trains the same factors in both families: 101,440 at R = 64."""
    code, out, err = params(capsys, "--preset", "cross-attention", "--rank", "64", "--no-ice", "--no-gqt", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["num_slices"] == 48 and report["slice_size"] == D
    assert report["groups"]["factors"] == 101_440 == (2 * D + 48 + 1) * 64
    assert report["heads"] == ["itm_head", "vision_proj", "text_proj"]
    assert report["model"] == {"family": "hf", "arch": "hf_blip_retrieval", "size": "base"}
    code, text, err = params(capsys, "--preset", "cross-attention", "--rank", "64")
    assert code == 0 and "101,440" in text and "Building transformers hf_blip_retrieval" in err


def test_tiny_vqa_counts_encoder_and_decoder_sites(capsys):
    code, out, _ = params(capsys, "--arch", "blip_vqa", "--size", "tiny", "--rank", "4", "--json")
    report = json.loads(out)
    assert code == 0 and report["num_slices"] == 2 * 2 * 4  # 2 encoder + 2 decoder layers × q, k, v, o
    assert report["groups"]["ice"] == 4 * 64  # one ICE vector of width d per fusion site


@pytest.mark.parametrize(("size", "rank", "d", "vision", "slices"), [("tiny", 4, 32, 48, 4), ("base", 64, 768, 1408, 24)])
def test_blip2_qformer_cross_attention_reads_wider_vision_features(capsys, size, rank, d, vision, slices):
    """The Q-Former's keys and values read the vision tower's features (1408 wide in BLIP-2): a width class
    with its own V; BLIP-2 base is counted on the meta device (3.7 billion parameters, no memory)."""
    code, out, err = params(capsys, "--arch", "blip2", "--size", size, "--rank", str(rank), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["slice_size"] == d and report["width_classes"] == {"out": [], "in": [vision]}
    assert report["num_slices"] == slices  # q, k, v, o of every Q-Former cross-attention (every other layer)
    assert report["groups"]["factors"] == (2 * d + vision + slices + 1) * rank


@pytest.mark.parametrize(("argv", "message"), [
    (["--preset", "blip_retrieval/reference"], r"unknown preset 'blip_retrieval/reference'"),
    (["--rank", "65", "--size", "tiny"], r"rank 65 exceeds the slice size d=64"),
])
def test_bad_arguments_are_clear_errors(capsys, argv, message):
    code, out, err = params(capsys, *argv)
    assert code == 2 and out == ""
    assert re.search(message, err.splitlines()[-1]), err


def test_an_adapter_larger_than_what_it_adapts_is_warned_about(capsys):
    code, out, err = params(capsys, "--rank", "768", "--core", "tucker")
    assert code == 0 and "203.1975%" in out
    assert "warning: this adapter trains 454,642,702 parameters, more than the 28,311,552 of the modules it adapts" in err


def test_arguments_are_checked_before_anything_is_built(capsys, monkeypatch):
    from aurora_pet.cli import params as command

    def refuse(*args):
        raise AssertionError("built a model for arguments that were already wrong")

    monkeypatch.setattr(command, "build_model", refuse)
    for argv in (["--rank", "10000"], ["--lora-rank", "0"], ["--preset", "nope"], ["--arch", "blip2", "--rank", "0"]):
        code, out, err = params(capsys, *argv)
        assert code == 2 and out == "" and "error:" in err, argv
