"""The benchmarks (bench/): the harness's methods are sound, and both --quick modes run end to end.

No timing is asserted anywhere: timings on a shared CPU are for BENCHMARKS.md, not for tests. The quick
runs are subprocesses run from the repository root. The package is ``bench``: fairscale installs an
unrelated top-level ``benchmarks`` package."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aurora_pet.demo.recipe import DEMO_AURORA
from bench import _harness as H
from bench import cost, learning

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_retrieval():
    return cost.build("retrieval", "tiny", 32)


def _step(call, samples, seed=0):
    torch.manual_seed(seed)
    call(dict(samples)).loss.backward()


def test_benchmarks_package_is_ours():
    assert Path(H.__file__).resolve().parent == ROOT / "bench"


def test_lora_targets_are_auroras_and_their_momentum_twins(tiny_retrieval):
    online, twins = H.lora_targets(tiny_retrieval)
    with H.quiet():
        active = H.setup(tiny_retrieval, H.Method("a", "aurora"))
    try:
        assert online == list(active.aurora.layers)
        assert twins == list(active.aurora.momentum_layers)
    finally:
        active.teardown()


@pytest.mark.parametrize("method", [
    H.Method("frozen", "frozen"), H.Method("heads", "heads"), H.Method("full", "full"),
    H.Method("aurora", "aurora", {"rank": 8}), H.Method("aurora merged", "aurora", {"rank": 8, "merged": True,
                                                                                   "randomise": True}),
    H.Method("lora", "lora", {"rank": 4}),
], ids=lambda m: m.name)
def test_setup_and_teardown_leave_the_model_as_it_was(tiny_retrieval, method):
    """One model serves every method in turn: installing and removing one must change nothing."""
    model = tiny_retrieval.eval()
    samples = H.retrieval_samples(2, 32)
    keys = list(model.state_dict())
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def outputs():
        with torch.no_grad():
            return [w() for w in cost.inference_workloads("retrieval", model, samples).values()]

    before = outputs()
    with H.quiet():
        active = H.setup(model, method)
    active.teardown()
    assert list(model.state_dict()) == keys
    assert all(not p.requires_grad for p in model.parameters())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=1e-6)
    for old, new in zip(before, outputs()):
        torch.testing.assert_close(new, old, rtol=0, atol=1e-5)


def test_frozen_floor_backpropagates_through_the_multimodal_stack_only(tiny_retrieval):
    model = tiny_retrieval.train()
    seen = []
    from lavis.models.med import BertEncoder

    def record(module, args, kwargs):
        seen.append((kwargs.get("mode"), (args[0] if args else kwargs["hidden_states"]).requires_grad))

    active = H.setup(model, H.Method("frozen", "frozen"))
    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.text_encoder.modules()
               if isinstance(m, BertEncoder)]
    try:
        _step(active.call, H.retrieval_samples(2, 32))
        heads = {id(p) for p in active.trainable}
        assert all(p.grad is None for p in model.parameters() if id(p) not in heads)  # no base-weight gradients
        assert all(p.grad is not None for p in active.trainable)
        # the ITM passes (multimodal) carry gradients from their first layer; ITC's text pass does not
        assert ("multimodal", True) in seen and ("text", False) in seen and ("multimodal", False) not in seen
    finally:
        for handle in handles:
            handle.remove()
        active.teardown()
        model.zero_grad(set_to_none=True)


def test_lora_twins_start_as_copies_and_only_online_lora_and_heads_train():
    model = cost.build("retrieval", "tiny", 32)
    online, twins = H.lora_targets(model)
    count = learning.inject_lora(model, rank=4)
    params = dict(model.named_parameters())
    assert count == sum(4 * 2 * 64 for _ in online)  # r·(d_in + d_out) per 64×64 target
    for source, twin in zip(online, twins):
        for part in ("lora_A.default.weight", "lora_B.default.weight"):
            assert params[f"{source}.{part}"].requires_grad and not params[f"{twin}.{part}"].requires_grad
            torch.testing.assert_close(params[f"{twin}.{part}"], params[f"{source}.{part}"])
    model.train()
    _step(model, H.retrieval_samples(2, 32))  # LAVIS's momentum update zips the twins without error


def test_adapter_count_matches_the_wrapped_tiny_model(tiny_retrieval):
    from aurora_pet.families.lavis.wrap import wrap_blip

    for rank, ice, gqt in ((32, True, True), (4, False, False), (16, True, False)):
        settings = {k: v for k, v in learning.demo_aurora().items() if k != "preset"}  # the recipe's extra key
        aurora = wrap_blip(tiny_retrieval, "cross-attention", **{**settings, "rank": rank, "ice": ice, "gqt": gqt})
        try:
            groups = aurora.parameter_report()["groups"]
            assert groups["factors"] + groups["ice"] + groups["gqt"] == learning.adapter_count(rank, ice, gqt)
        finally:
            aurora.unload()
            tiny_retrieval.__dict__.pop("_momentum_update", None)


def test_learning_plan_compares_every_method_at_a_matched_lora_rank():
    rank = DEMO_AURORA["rank"]
    specs = learning.plan(quick=False)
    kinds = {s.kind for s in specs if s.group == "methods"}
    assert kinds == {"heads", "aurora", "lora", "full"}
    matched = next(s for s in specs if "Aurora's count" in s.name)
    assert abs(matched.options["rank"] * 8 * 128 - learning.adapter_count(rank)) <= 8 * 128 / 2
    assert {s.options["rank"] for s in specs if s.group == "rank sweep"} | {rank} == {4, 16, 32, 64}
    assert len([s for s in specs if s.group == "ICE/GQT ablation"]) == 3


def test_ratios_are_taken_within_rounds():
    times = {"frozen": [[1.0, 1.0], [2.0, 2.0]], "x": [[1.1, 1.1], [2.2, 2.2]]}
    mid, low, high = cost._ratios(times, "frozen")["x"]
    assert mid == pytest.approx(1.1) and low == pytest.approx(1.1) and high == pytest.approx(1.1)


def _run(module: str, *args: str, timeout: int) -> None:
    subprocess.run([sys.executable, "-m", f"bench.{module}", *args], cwd=ROOT, check=True, timeout=timeout,
                   stdout=subprocess.DEVNULL)


@pytest.mark.slow
def test_cost_quick(tmp_path):
    """About 40 s: tiny models for time and memory, and BLIP-base for the adapter files."""
    _run("cost", "--quick", "--out", str(tmp_path), timeout=600)
    results = json.loads((tmp_path / "cost_quick.json").read_text())
    expected = [m.name for m in cost.training_methods()]
    for arch in ("retrieval", "vqa"):
        assert list(results["training"][arch]["cpu"]) == expected
        assert list(results["memory"][arch]["peak_rss"]) == expected
        for times in results["inference"][arch]["cpu"].values():
            assert list(times) == [m.name for m in cost.inference_methods()]
    assert list(results["training"]["retrieval ITM passes only"]["cpu"]) == [n for n in expected if "full" not in n]
    report = (tmp_path / "cost_quick.md").read_text()
    assert all(name in report for name in expected)
    assert (tmp_path / "cost_quick_step_time.png").stat().st_size > 0
    # adapter files of BLIP-base retrieval, cross-attention, R=64: sizes, not timings
    sizes = {row["config"]: row for row in results["sizes"]["retrieval"]}
    factors = sizes["aurora cp R=64, no heads"]["groups"]["factors"]
    assert factors == 4 * (2 * 768 + 48 + 1) * 64 <= 0.5e6  # the shared factors: 405,760 bytes
    default = sizes["aurora cp R=64 +ICE/GQT +heads (preset default)"]
    assert default["file_bytes"] >= sum(default["groups"].values())


@pytest.mark.slow
def test_learning_quick(tmp_path):
    """A few minutes (more the first time, when the demo's pre-trained tiny BLIP is trained and cached)."""
    _run("learning", "--quick", "--out", str(tmp_path), timeout=1800)
    results = json.loads((tmp_path / "learning_quick.json").read_text())
    assert [row["method"] for row in results["rows"]] == [s.name for s in learning.plan(quick=True)]
    for run in results["runs"]:
        assert 0.0 <= run["metrics"]["r1_mean"] <= 100.0 and run["trainable"] > 0
    assert (tmp_path / "learning_quick_accuracy_vs_params.png").stat().st_size > 0
