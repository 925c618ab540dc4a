"""The benchmarks (bench/): the harness's methods are sound, and both --quick modes run end to end.

No timing is asserted anywhere: timings on a shared CPU are for BENCHMARKS.md, not for tests. The quick
runs are subprocesses run from the repository root. The package is ``bench``: fairscale installs an
unrelated top-level ``benchmarks`` package."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
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


def test_learning_distillation_specs_bring_their_teacher():
    """Every distillation spec (full and quick plans) comes after full fine-tuning, its teacher; selecting one
    alone brings the teacher first, on its own grid, while --lrs replaces the selected spec's grid."""
    for quick in (False, True):
        specs = learning.plan(quick=quick)
        distilled = [i for i, s in enumerate(specs) if s.distill is not None]
        assert distilled and all(specs[i].group == "distillation" for i in distilled)
        assert min(distilled) > next(i for i, s in enumerate(specs) if s.kind == learning.TEACHER_KIND)
        assert all("distill" not in specs[i].method_options and specs[i].distill["stages"] for i in distilled)
    specs = learning.plan(quick=False)
    assert {s.kind for s in specs if s.distill is not None} == {"aurora", "lora"}
    name = next(s.name for s in specs if s.distill is not None and s.kind == "aurora")
    chosen = learning.select(specs, [name], lrs=[0.016])
    assert [s.kind for s in chosen] == ["full", "aurora"] and chosen[1].grid == (0.016,)
    assert chosen[0].grid == learning.LR_GRIDS["full"]
    assert list(learning.extensions(chosen[1].grid, [{"lr": 0.016, "val_best": 1.0}], 2)) == []


def test_learning_vqa_plan_compares_aurora_with_matched_peers_on_blip_vqa():
    """VQA: no heads (BlipVQA has none), Aurora R=64 on the three blip_vqa presets, LoRA r=1 and r=8 and VeRA of
    Aurora's count on the best preset's targets, full fine-tuning, Aurora distilled with VQA's terms."""
    from aurora_pet.distill import DistillConfig
    from aurora_pet.families.lavis.distill import TASK_PARTS

    vqa, rank = learning.VQA, DEMO_AURORA["rank"]
    specs = learning.plan(quick=False, task=vqa)
    assert [s.kind for s in specs] == ["aurora", "full", "aurora", "aurora", "lora", "lora", "vera", "aurora"]
    aurora = [s for s in specs if s.kind == "aurora" and s.distill is None]
    assert [s.options.get("preset", "cross-attention") for s in aurora] == ["cross-attention", "reference",
                                                                             "text-attention"]
    assert all(s.options["rank"] == rank for s in aurora)
    peers = [s for s in specs if s.group == "peers"]
    assert [(s.kind, s.options["preset"]) for s in peers] == [("lora", learning.BEST_PRESET)] * 2 + [
        ("vera", learning.BEST_PRESET)]
    assert sorted(s.options["rank"] for s in peers if s.kind == "lora") == [1, 8]
    # VeRA's count Σ (rank + d_out) over the targets is Aurora's count within half a rank step
    model = learning._tiny_model(vqa.arch)
    online, twins = H.lora_targets(model, learning.BEST_PRESET)
    assert online and not twins  # BlipVQA has no momentum encoders
    modules = dict(model.named_modules())
    vera = next(s for s in peers if s.kind == "vera")
    count = sum(vera.options["rank"] + modules[name].out_features for name in online)
    assert abs(count - learning.aurora_adapter_count(learning.BEST_PRESET, rank, arch=vqa.arch)) <= len(online) / 2
    (distilled,) = [s for s in specs if s.distill is not None]
    config = DistillConfig.from_mapping(distilled.distill)
    assert {part for part, weight in config.weights().items() if weight > 0} >= set(TASK_PARTS[vqa.arch])
    assert distilled.distill == vqa.distill and "itc_weight" not in distilled.distill
    quick = learning.plan(quick=True, task=vqa)
    assert [s.kind for s in quick] == ["aurora", "lora", "vera", "full", "aurora"] and quick[-1].distill
    assert learning.plan(quick=False)[0].kind == "heads"  # retrieval keeps its heads-only row


def test_learning_tasks_extract_their_metric_and_keep_retrievals_identity():
    """Each task reads its own validation curve and test metric from the runner's rows; retrieval's settings
    identity is the one its result files hold (no task), VQA's names the task, so the two never mix."""
    history = [{"epoch": 0, "train_loss": 2.0, "train_lr": 1e-3, "val_r_mean": 40.0, "val_txt_r1": 30.0,
                "val_img_r1": 20.0, "val_agg_metrics": 55.0, "val_other": 50.0, "val_number": 60.0,
                "val_yes/no": 70.0, "val_best_epoch": 0.0}]
    final = {"epoch": "best", "best_epoch": 0, "test_r_mean": 41.0, "test_txt_r1": 32.0, "test_img_r1": 22.0,
             "test_agg_metrics": 56.0, "test_yes/no": 71.0}
    curves, metrics = learning.RETRIEVAL.extract(history, final)
    assert curves == [{"epoch": 0, "train_loss": 2.0, "val_r_mean": 40.0, "val_txt_r1": 30.0, "val_img_r1": 20.0}]
    assert metrics["r_mean"] == 41.0 and metrics["r1_mean"] == 27.0
    curves, metrics = learning.VQA.extract(history, final)
    assert curves == [{"epoch": 0, "train_loss": 2.0, "val_agg_metrics": 55.0, "val_other": 50.0,
                       "val_number": 60.0, "val_yes/no": 70.0}]
    assert metrics[learning.VQA.metric] == 56.0 and metrics["yes/no"] == 71.0 and "r1_mean" not in metrics
    assert learning.VQA.extract([{"epoch": 0}], None)[0][0]["val_agg_metrics"] != 0.0  # NaN when absent
    retrieval = learning.Settings.make(quick=False).identity()
    assert set(retrieval) == {"epochs", "n_train", "n_val", "n_test", "batch", "k_test", "data_seed"}
    vqa = learning.Settings.make(quick=False, task="vqa").identity()
    assert vqa == {**retrieval, "task": "vqa", "data": {"questions_per_image": learning.VQA_QUESTIONS}}
    assert learning.stem(learning.VQA, True) == "learning_vqa_quick" and learning.stem(learning.RETRIEVAL, False) \
        == "learning"
    from lavis.tasks.retrieval import RetrievalTask

    original = RetrievalTask.__dict__["_report_metrics"]
    with learning.lavis_for_selection(learning.VQA):
        assert RetrievalTask.__dict__["_report_metrics"] is original  # VQA's agg_metrics is its accuracy already
    with learning.lavis_for_selection(learning.RETRIEVAL):
        assert RetrievalTask.__dict__["_report_metrics"] is not original
    assert RetrievalTask.__dict__["_report_metrics"] is original


def test_learning_distillation_is_taught_by_the_chosen_full_finetuning_run(tmp_path, monkeypatch):
    """No training: the teacher is full fine-tuning's chosen-rate, first-seed run; its checkpoint is kept when it
    trains, the distillation runs get it and name it in their key, and a run reused from the cache without its
    checkpoint is trained again to make one."""
    import types

    settings = learning.Settings.make(quick=True, seeds=2)
    setup = learning.Setup(types.SimpleNamespace(checkpoint=Path("pre.safetensors")), {}, tmp_path, settings,
                           tmp_path / "teachers")
    calls = []

    def fake(setup, spec, lr, seed, index, verbose=False, teacher=None, keep=None):
        calls.append((spec.kind, lr, seed, teacher, keep))
        if keep is not None:
            keep.parent.mkdir(parents=True, exist_ok=True)
            keep.write_bytes(b"weights")
        val = (30.0 if spec.kind == "full" else 15.0) - (lr not in (learning.LR_GRIDS["full"][1],
                                                                    learning.DEFAULT_GRID[1])) * 10.0
        return {**_fake_run(spec, lr, seed, val=val, test=val + 1, trainable=5), "best_epoch": 0}

    monkeypatch.setattr(learning, "run", fake)
    plan = lambda: [learning.Spec("full", "full"),  # noqa: E731
                    learning.Spec("a + distill", "aurora", {"rank": 8, "distill": dict(learning.DISTILL)})]
    specs, cached, info = plan(), {}, {}
    runs = learning.protocol(setup, specs, cached, lambda r: None, teacher_info=info)
    chosen = learning.LR_GRIDS["full"][1]
    path = learning.teacher_file(setup, specs[0], chosen, 0)
    assert [p.name for p in (tmp_path / "teachers").glob("*.pth")] == [path.name]  # the other rates' removed
    assert specs[1].distill["teacher"] == {"method": "full", "kind": "full", "lr": chosen, "seed": 0}
    assert json.loads(specs[1].key)["options"]["distill"]["teacher"]["lr"] == chosen
    assert {c[3] for c in calls if c[0] == "aurora"} == {path}
    assert info["checkpoint"] == path.name and info["test_r_mean"] == 31.0 == info["run_test_r_mean"]
    assert info["source"] == "the run's checkpoint"
    assert len(runs) == 3 + 1 + 3 + 1  # two sweeps, one more seed each
    path.unlink()  # a later --resume without the checkpoint: the teacher's run trains again, nothing else
    calls.clear()
    specs, info = plan(), {}
    learning.protocol(setup, specs, {(r["key"], r["lr"], r["seed"]): r for r in runs}, lambda r: None,
                      teacher_info=info)
    assert calls == [("full", chosen, 0, None, path)] and path.is_file()
    assert info["source"].startswith("trained again") and info["source"].endswith("True")


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


def _fake_run(spec, lr, seed, val, test, trainable, val_last=None, loss=1.0):
    history = [{"epoch": 0, "train_loss": loss, "val_r_mean": val, "val_txt_r1": 0.0, "val_img_r1": 0.0}]
    if val_last is not None:
        history.append({**history[0], "epoch": 1, "val_r_mean": val_last})
    return {"method": spec.name, "group": spec.group, "kind": spec.kind, "key": spec.key, "lr": lr, "seed": seed,
            "trainable": trainable, "history": history, "val_best": val, "val_last": history[-1]["val_r_mean"],
            "metrics": {"r_mean": test, "r1_mean": test / 2}, "seconds": 1.0, "stage": "sweep"}


def test_learning_protocol_chooses_on_validation_and_reports_shares_of_full_finetunings_gain():
    """No training: the selection reads validation only (the test split favours another rate here), the share
    is (method − before) / (full − before) on the seeds' means, and a run validating below the unadapted model
    is flagged."""
    full, peft = learning.Spec("full", "full"), learning.Spec("a", "aurora", {"rank": 8})
    before = {"val": {"r_mean": 10.0}, "test": {"r_mean": 5.0}}
    lo, mid, hi = peft.grid
    runs = [_fake_run(peft, lo, 0, val=12.0, test=40.0, trainable=10),  # best on test, not on validation
            _fake_run(peft, mid, 0, val=20.0, test=20.0, trainable=10),
            _fake_run(peft, hi, 0, val=15.0, test=30.0, trainable=10, val_last=8.0),  # ends below "before"
            _fake_run(peft, mid, 1, val=21.0, test=24.0, trainable=10),
            _fake_run(peft, mid, 2, val=19.0, test=22.0, trainable=10)]
    runs += [_fake_run(full, lr, 0, val=30.0 - i, test=45.0 - i, trainable=1000) for i, lr in enumerate(full.grid)]
    runs += [_fake_run(full, full.grid[0], s, val=30.0, test=t, trainable=1000) for s, t in ((1, 44.0), (2, 46.0))]
    rows = {r["method"]: r for r in learning.summarise([full, peft], runs, before, [0, 1, 2])}
    assert rows["a"]["lr"] == mid and rows["full"]["lr"] == full.grid[0]
    assert rows["a"]["seeds"] == [0, 1, 2] and rows["a"]["mean"] == pytest.approx(22.0)
    assert rows["full"]["mean"] == pytest.approx(45.0)
    assert rows["a"]["share"] == pytest.approx((22.0 - 5.0) / (45.0 - 5.0)) and rows["full"]["share"] == 1.0
    assert [s["diverged"] for s in rows["a"]["sweep"]] == [False, False, True]
    assert rows["a"]["diverged"] == [f"lr {hi:.3g} seed 0"]
    verdict = learning.targets(list(rows.values()))
    assert verdict["evaluated"] and verdict["share"] == pytest.approx(17 / 40) and not verdict["share_met"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["retrieval", "vqa"])
def test_learning_quick_runs_the_whole_protocol_consistently(tmp_path, task):
    """About 4 minutes (VQA: 1.5, once its pre-trained model is cached; 4 more to make it): --quick is the full
    protocol (sweep on validation, seeds, shares, curves, plot) on a tiny setting, distillation from the run's
    own full fine-tuning included; its outputs must agree with each other and with the protocol's definitions."""
    task = learning.TASKS[task]
    metric = task.metric
    _run("learning", "--quick", "--task", task.name, "--out", str(tmp_path), "--teachers", str(tmp_path / "teachers"),
         timeout=1800)
    name = learning.stem(task, quick=True)
    results = json.loads((tmp_path / f"{name}.json").read_text())
    settings = results["settings"]
    assert len(settings["seeds"]) >= 3 and settings["task"] == task.name
    before_val, before_test = results["before"]["val"][metric], results["before"]["test"][metric]
    rows = results["rows"]
    assert [row["method"] for row in rows] == [s.name for s in learning.plan(quick=True, task=task)]
    full = next(row for row in rows if row["kind"] == "full")
    assert full["share"] == 1.0
    assert all(0.0 <= value <= 100.0 for row in rows for value in (*row[f"test_{metric}"], row["mean"]))
    for row in rows:
        grid = settings["lr_grids"][row["method"]]
        assert len(grid) >= 3 and len({round(b / a, 6) for a, b in zip(grid, grid[1:])}) == 1  # log-spaced
        runs = [r for r in results["runs"] if r["method"] == row["method"]]
        sweep = {r["lr"]: r for r in runs if r["seed"] == settings["seeds"][0]}
        assert sorted(sweep) == [s["lr"] for s in row["sweep"]] and set(grid) <= set(sweep)  # grid + extensions
        assert row["lr"] == max(sweep, key=lambda lr: sweep[lr]["val_best"])  # chosen on validation
        for run in runs:
            assert len(run["history"]) == settings["epochs"] and run["trainable"] == row["trainable"] > 0
            assert run["val_best"] == max(h[f"val_{metric}"] for h in run["history"])
        chosen = sorted((r for r in runs if r["lr"] == row["lr"]), key=lambda r: r["seed"])
        assert [r["seed"] for r in chosen] == row["seeds"] == settings["seeds"]
        assert row["mean"] == pytest.approx(sum(r["metrics"][metric] for r in chosen) / len(chosen))
        assert row["share"] == pytest.approx((row["mean"] - before_test) / (full["mean"] - before_test))
        assert [s["diverged"] for s in row["sweep"]] == [sweep[lr]["val_last"] < before_val for lr in sorted(sweep)]
    # distillation: the teacher is the full fine-tuning run of this JSON at its chosen rate and first seed
    teacher = settings["teacher"]
    distilled = [row for row in rows if row["options"].get("distill")]
    assert distilled and all(row["options"]["distill"]["teacher"] == {
        "method": full["method"], "kind": "full", "lr": full["lr"], "seed": settings["seeds"][0]} for row in distilled)
    made = next(r for r in results["runs"] if r["method"] == full["method"] and r["lr"] == full["lr"]
                and r["seed"] == settings["seeds"][0])
    assert teacher["lr"] == full["lr"] and teacher[f"test_{metric}"] == made["metrics"][metric]
    assert teacher["best_epoch"] == made["best_epoch"] and (tmp_path / "teachers" / teacher["checkpoint"]).is_file()
    curves = (tmp_path / f"{name}_curves.csv").read_text().splitlines()
    assert len(curves) == 1 + sum(len(r["history"]) for r in results["runs"])
    assert curves[0].endswith(",".join(f"val_{key}" for key in task.curves))
    report = (tmp_path / f"{name}.md").read_text()
    assert all(row["method"] in report for row in rows) and "share of full FT's gain" in report
    assert f"test {task.label}" in report
    assert (tmp_path / f"{name}_accuracy_vs_params.png").stat().st_size > 0


# -- the cost benchmark's GPU path (issue 13): its device-independent parts, on the CPU ---------------

class _FakeGpu(H.CpuDevice):
    """The CPU's clocks and memory under the CUDA path's keys and labels: the loops and tables of the GPU path
    run here without a GPU."""

    name = H.CudaDevice.name
    clocks, clock_labels, step_unit = H.CudaDevice.clocks, H.CudaDevice.clock_labels, H.CudaDevice.step_unit
    memory_keys, memory_label = H.CudaDevice.memory_keys, H.CudaDevice.memory_label

    def timed(self, run):
        reading = super().timed(run)
        return {"cuda": reading["cpu"], "cuda_wall": reading["wall"], "other_load": reading["other_load"]}

    def begin_memory_pass(self):
        pass  # not the process-wide allocator change of the CPU's memory pass


def test_cpu_device_times_a_call_and_reads_peak_memory():
    device = H.make_device("cpu")
    assert device.dtype == "fp32" and device.torch_device == torch.device("cpu") and device.rng_devices == []
    calls = []
    reading = device.timed(lambda: calls.append(sum(i * i for i in range(200_000))))
    assert len(calls) == 1 and set(reading) == {*device.clocks, "other_load"}
    assert reading["cpu"] > 0 and reading["wall"] > 0 and reading["other_load"] >= 0
    with device.autocast():
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    device.reset_peak()
    before = device.allocated()
    block = torch.ones(16, 2**20)  # 64 MiB, touched
    assert device.peak() >= before + block.numel() * 4 * 0.9
    with pytest.raises(ValueError, match="bf16 is not available on cpu"):
        H.make_device("cpu", "bf16")


def test_cuda_is_a_clear_error_without_a_gpu(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(H.DeviceUnavailable, match=r"--device cuda needs a CUDA GPU.*is_available\(\) is False"):
        H.make_device("cuda")
    with pytest.raises(SystemExit, match="--device cuda needs a CUDA GPU"):
        cost.main(["--device", "cuda", "--quick", "--skip", "sizes", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # stopped before anything was built or written


def test_cost_defaults_per_device_are_lavis_published_setting_on_cuda():
    import yaml
    from lavis.common.utils import get_abs_path

    cpu = cost.settings_of(cost.parse_args([]))
    assert {k: cpu[k] for k in ("device", "dtype", "size", "image_size", "batch", "rounds", "steps", "warmup",
                                "rerank_batch")} == {
        "device": "cpu", "dtype": "fp32", "size": "base", "image_size": 224, "batch": 2, "rounds": 5, "steps": 1,
        "warmup": 1, "rerank_batch": 8}
    gpu = cost.settings_of(cost.parse_args(["--device", "cuda"]))
    assert gpu["dtype"] == "bf16" and gpu["image_size"] == 384 and gpu["batch"] == {"retrieval": 32, "vqa": 16}
    assert gpu["warmup"] == 3 and gpu["steps"] == 5 and gpu["rerank_batch"] == 256
    assert [cost.batch_of(gpu, a) for a in ("retrieval", "retrieval ITM passes only", "vqa")] == [32, 32, 16]
    # the published batch (per GPU) and k_test are those of LAVIS's own fine-tuning recipes
    for arch, recipes in (("retrieval", ("retrieval_coco_ft", "retrieval_flickr_ft")), ("vqa", ("vqav2_ft",))):
        for recipe in recipes:
            config = yaml.safe_load(Path(get_abs_path(f"projects/blip/train/{recipe}.yaml")).read_text())
            assert config["run"]["batch_size_train"] == cost.PUBLISHED_BATCH[arch]
            if recipe == "retrieval_coco_ft":
                assert config["run"]["k_test"] == cost.PUBLISHED_K_TEST
    explicit = cost.settings_of(cost.parse_args(["--device", "cuda", "--batch", "8", "--image-size", "480",
                                                 "--dtype", "fp32", "--arch", "vqa"]))
    assert (explicit["batch"], explicit["image_size"], explicit["dtype"]) == (8, 480, "fp32")
    assert cost.settings_of(cost.parse_args(["--device", "cuda", "--arch", "vqa"]))["batch"] == {"vqa": 16}
    quick = cost.settings_of(cost.parse_args(["--device", "cuda", "--quick"]))
    assert (quick["size"], quick["image_size"], quick["batch"], quick["rerank_batch"]) == ("tiny", 32, 2, 0)


def test_gpu_path_loops_key_results_by_clock_and_render_gpu_columns(tiny_retrieval):
    """The training, memory and inference loops with the CUDA path's keys (on the CPU's clocks), and the
    report of such a result: GPU ms, peak GPU GiB; a CPU result keeps its CPU columns."""
    device = _FakeGpu()
    model = tiny_retrieval
    samples = H.retrieval_samples(2, 32)
    methods = [m for m in cost.training_methods(rank=4, lora_rank=2) if m.kind in ("frozen", "lora", "full")][:3]
    quiet = lambda *_: None  # noqa: E731
    training = cost.bench_training(model, cost.lavis_step(samples, device), methods, 2, 1, 1, device=device,
                                   log=quiet)
    assert set(training) == {"cuda", "cuda_wall", "trainable", "other_load"}
    assert all(len(training["cuda"][m.name]) == 2 for m in methods)
    memory = cost.bench_memory(model, cost.lavis_step(samples, device), methods, device=device, log=quiet)
    assert set(memory) == {"peak_cuda", "added_cuda", "allocated_cuda"}
    inference = cost.bench_inference("retrieval", model, samples, cost.inference_methods(rank=4, lora_rank=2)[:2],
                                     1, 1, device=device, log=quiet)
    assert set(inference) == {"cuda", "cuda_wall", "merge_max_abs_diff", "other_load"}
    settings = cost.settings_of(cost.parse_args(["--device", "cuda", "--quick"]))
    results = {"settings": settings, "machine": {**H.machine(), "gpu": "a GPU", "gpu_memory": 2**30, "cuda": "x"},
               "training": {"retrieval": training}, "inference": {"retrieval": inference}, "sizes": {},
               "memory": {"retrieval": memory}}
    report = cost.render(results)
    assert "GPU ms/step" in report and "× frozen (GPU)" in report and "peak GPU GiB" in report
    assert "GPU ms" in report and "CPU s/step" not in report and "a GPU" in report
    renamed = {"cpu": training["cuda"], "wall": training["cuda_wall"], **{k: training[k] for k in
                                                                         ("trainable", "other_load")}}
    cpu_report = cost.training_table(renamed, {"peak_rss": memory["peak_cuda"], "added_rss": memory["added_cuda"]})
    assert "CPU s/step" in cpu_report and "peak RSS GiB" in cpu_report and "GPU" not in cpu_report


def test_learning_report_merges_result_files_and_shows_unfinished_protocols(tmp_path):
    """--report trains nothing: runs of several result files (same settings) are summarised together, a method
    with one rate and one seed so far is reported as such, and files of other settings are refused."""
    specs = {s.kind: s for s in learning.plan(quick=False) if s.kind in ("full", "heads")}
    full, heads = specs["full"], specs["heads"]
    settings = {"identity": {"epochs": 12}, "seeds": [0, 1, 2], "epochs": 12, "n_train": 256, "n_val": 32,
                "n_test": 96, "batch": 16, "k_test": 32}
    before = {"val": {"r_mean": 10.0}, "test": {"r_mean": 5.0}}
    first = [_fake_run(full, lr, 0, val=20.0 + i, test=40.0, trainable=1000) for i, lr in enumerate(full.grid)]
    first += [_fake_run(full, full.grid[-1], s, val=22.0, test=t, trainable=1000) for s, t in ((1, 44.0), (2, 45.0))]
    second = [_fake_run(heads, heads.grid[0], 0, val=12.0, test=9.0, trainable=10)]
    paths = []
    for i, runs in enumerate((first, second)):
        path = tmp_path / f"r{i}.json"
        path.write_text(json.dumps({"settings": settings, "machine": {}, "before": before, "runs": runs}))
        paths.append(path)
    report = learning.main(["--report", *map(str, paths), "--out", str(tmp_path / "out"), "--name", "merged"])
    rows = {row["kind"]: row for row in report["rows"]}
    assert rows["full"]["lr"] == full.grid[-1] and rows["full"]["mean"] == pytest.approx((40 + 44 + 45) / 3)
    assert rows["heads"]["seeds"] == [0] and rows["heads"]["lr_at_edge"]
    assert rows["heads"]["share"] == pytest.approx((9.0 - 5.0) / ((40 + 44 + 45) / 3 - 5.0))
    assert "(n=1)" in (tmp_path / "out" / "merged.md").read_text()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"settings": {**settings, "identity": {"epochs": 2}}, "before": before, "runs": []}))
    with pytest.raises(SystemExit, match="other settings"):
        learning.main(["--report", str(paths[0]), str(other), "--out", str(tmp_path / "out")])


def test_report_finds_distillation_runs_by_their_key_without_the_teacher():
    """A stored distillation run's key names its teacher, the plan's spec does not: ``--report`` matches them
    and takes the teacher from the stored key; runs of one spec from two teachers are refused."""
    specs = learning.plan(quick=False)
    distilled = next(s for s in specs if s.distill is not None and s.kind == "aurora")
    plain = next(s for s in specs if s.kind == "full")
    teacher = {"method": "full fine-tuning", "kind": "full", "lr": 0.002, "seed": 0}
    stored = replace(distilled, options={**distilled.options,
                                                  "distill": {**distilled.distill, "teacher": teacher}})
    found = learning._stored_specs(specs, {stored.key, plain.key})
    assert [s.name for s in found] == [plain.name, distilled.name]
    assert found[1].key == stored.key and found[1].distill["teacher"] == teacher
    assert distilled.distill.get("teacher") is None  # the plan's spec is left as it was
    other = replace(distilled, options={**distilled.options,
                                                 "distill": {**distilled.distill, "teacher": {**teacher, "lr": 1}}})
    with pytest.raises(SystemExit, match="different teachers"):
        learning._stored_specs(specs, {stored.key, other.key})
