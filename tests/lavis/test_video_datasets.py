"""The LAVIS data side of BLIP on video (`aurora_pet.video.lavis_data`, `aurora_pet.video.checks`): our builders on
the generated mp4s, seeded training frames, BLIP-style QA samples and the exact-match task, and the up-front
checks that name every bad file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from lavis.common.config import Config
from lavis.common.registry import registry
from lavis.datasets.builders import base_dataset_builder
from omegaconf import OmegaConf
from torch.utils.data import ConcatDataset

import aurora_pet.families.lavis.video  # noqa: F401  (registers the models, processors, builders and task)
from aurora_pet.data.synthetic_video import (
    ANSWER_LIST,
    write_mp4,
    write_video_qa_dataset,
    write_video_retrieval_dataset,
)
from aurora_pet.training.data import DataError, check_split_sizes
from aurora_pet.video import VideoError, frame_rng, pixel_values, read_frames
from aurora_pet.video.checks import VIDEO_BUILDERS, check_video_datasets
from aurora_pet.video.lavis_data import (
    BlipVideoTrainProcessor,
    VideoQADataset,
    aurora_datasets_config,
    set_frame_epoch,
)
from aurora_pet.video.qa import exact_match_accuracy, read_answer_list

SIZE, FRAMES, N = 32, 16, 4
SMALL = dict(n_train=4, n_val=2, n_test=2, image_size=SIZE, num_frames=FRAMES)


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    def refuse(url, *args, **kwargs):
        raise AssertionError(f"LAVIS tried to download {url}")

    monkeypatch.setattr(base_dataset_builder, "download_url", refuse)


def merged_section(written: dict) -> tuple[str, dict]:
    """Our builder's name and its section merged with the builder's defaults, as a recipe's Config does."""
    section = aurora_datasets_config(written, num_frames=N, image_size=SIZE)
    (name, _), = section.items()
    return name, Config.build_dataset_config({"datasets": section}).datasets[name]


def build(written: dict) -> dict:
    name, cfg = merged_section(written)
    return registry.get_builder_class(name)(cfg).build_datasets()


def test_builders_are_registered_with_their_defaults():
    for name in VIDEO_BUILDERS:
        defaults = Config.build_dataset_config({"datasets": {name: {}}}).datasets
        assert list(defaults) == [name]  # only our builder: LAVIS's of the same data is not built beside it
        cfg = defaults[name]
        assert cfg.vis_processor.train == {"name": "blip_video_train", "num_frames": 8, "image_size": 224}
        assert cfg.vis_processor.eval.name == "blip_video_eval"
        assert cfg.build_info.videos.storage.endswith("/videos")
        assert ("ans2label" in cfg.build_info.annotations) == name.endswith("_qa_aurora")


@pytest.mark.parametrize("builder", ["msrvtt_retrieval", "didemo_retrieval"])
def test_retrieval_samples(builder, tmp_path):
    written = write_video_retrieval_dataset(tmp_path, builder=builder, **SMALL)
    data = build(written)
    per_video = 3 if builder == "msrvtt_retrieval" else 1
    assert {s: len(d) for s, d in data.items()} == {"train": 4 * per_video, "val": 2, "test": 2}
    sample = data["train"][0]
    assert set(sample) == {"video", "text_input", "image_id"} and sample["image_id"] == 0
    assert tuple(sample["video"].shape) == (N, 3, SIZE, SIZE) and sample["video"].dtype == torch.float32
    val = data["val"]
    path = Path(written["videos"]) / val.annotation[1]["video"]
    assert torch.equal(val[1]["video"], pixel_values(read_frames(path, N, size=SIZE)))  # segment middles
    assert len(val.text) == 2 * per_video


def test_training_frames_are_seeded_by_seed_epoch_and_index(tmp_path):
    written = write_video_retrieval_dataset(tmp_path, **SMALL)
    registry.register("configuration", OmegaConf.create({"run_cfg": {"seed": 7}}))  # what LAVIS's Config registers
    try:
        data = build(written)
    finally:
        registry.mapping["state"].pop("configuration")
    train = data["train"]
    assert train.seed == 7 and train.epoch == 0
    path = Path(written["videos"]) / train.annotation[5]["video"]
    expected = pixel_values(read_frames(path, N, size=SIZE, rng=frame_rng(7, 0, 5)))
    assert torch.equal(train[5]["video"], expected) and torch.equal(train[5]["video"], train[5]["video"])
    set_frame_epoch(data, 3)  # a runner's {split: dataset} or {name: {split: dataset}}
    assert train.epoch == 3 and torch.equal(train[5]["video"], pixel_values(read_frames(
        path, N, size=SIZE, rng=frame_rng(7, 3, 5))))
    set_frame_epoch({"train": ConcatDataset([train]), "val": data["val"]}, 5)  # as LAVIS's runner holds them
    assert train.epoch == 5
    epochs = {tuple(frame_rng(7, e, 5).integers(0, 1000, 4)) for e in range(4)}
    assert len(epochs) == 4  # another epoch, other frames
    with pytest.raises(ValueError, match=r"draws random frames: pass rng .* reading .*video"):
        BlipVideoTrainProcessor(N, SIZE)(path)


@pytest.mark.parametrize("builder", ["msrvtt_qa", "msvd_qa"])
def test_qa_samples_carry_answer_strings(builder, tmp_path):
    written = write_video_qa_dataset(tmp_path, builder=builder, **SMALL)
    data = build(written)
    assert {s: len(d) for s, d in data.items()} == {"train": 8, "val": 4, "test": 4}
    for dataset in data.values():
        assert isinstance(dataset, VideoQADataset) and dataset.answer_list == ANSWER_LIST
    entries = json.loads(Path(written["annotations"]["test"][0]).read_text())
    batch = data["test"].collater([data["test"][i] for i in range(3)])
    assert set(batch) == {"video", "text_input", "answer", "weight", "n_answers", "question_id"}
    assert tuple(batch["video"].shape) == (3, N, 3, SIZE, SIZE)
    assert batch["answer"] == [e["answer"] for e in entries[:3]]
    assert batch["question_id"].tolist() == [e["question_id"] for e in entries[:3]]
    assert batch["weight"].tolist() == [1.0] * 3 and batch["n_answers"].tolist() == [1] * 3


def test_video_qa_task_scores_exact_matches(tmp_path):
    from aurora_pet.video.lavis_data import VideoQATask

    written = write_video_qa_dataset(tmp_path, **SMALL)
    cfg = OmegaConf.create({"run_cfg": {"num_beams": 1, "max_len": 5, "min_len": 1, "inference_method": "rank",
                                        "num_ans_candidates": 4}})
    task = registry.get_task_class("video_qa").setup_task(cfg)
    assert isinstance(task, VideoQATask)
    name, section = merged_section(written)
    task.build_datasets(OmegaConf.create({"datasets_cfg": {name: section}}))
    assert task.answer_list == ANSWER_LIST  # what ranking chooses from

    class Oracle:  # answers the first two questions right and the others "star"
        def predict_answers(self, samples, answer_list, **kwargs):
            return [a if i < 2 else "star" for i, a in enumerate(samples["answer"])]

    data = build(written)["test"]
    batch = data.collater([data[i] for i in range(4)])
    results = task.valid_step(Oracle(), batch)
    assert [r["gt_answer"] for r in results] == batch["answer"]
    registry.mapping["paths"]["output_dir"] = str(tmp_path)
    try:
        result_file = tmp_path / "test_vqa_result.json"
        result_file.write_text(json.dumps(results))
        metrics = task._report_metrics(str(result_file), "test")
    finally:
        registry.mapping["paths"].pop("output_dir")
    assert metrics == {"agg_metrics": 50.0, "acc": 50.0}
    assert exact_match_accuracy(["left ", "up"], ["left", "down"]) == 50.0


# -- the up-front checks ----------------------------------------------------------------------------

def test_checks_give_split_sizes(tmp_path):
    retrieval = write_video_retrieval_dataset(tmp_path, **SMALL)
    qa = write_video_qa_dataset(tmp_path, builder="msvd_qa", **SMALL)
    sections = dict([merged_section(retrieval), merged_section(qa)])
    sizes = check_video_datasets(sections, "/nonexistent")  # absolute paths: the cache root is not used
    ret, msvd = sizes["msrvtt_retrieval_aurora"], sizes["msvd_qa_aurora"]
    assert (ret["train"].entries, ret["train"].images, ret["val"].entries, ret["val"].texts) == (12, 4, 2, 6)
    assert (msvd["train"].entries, msvd["train"].images, msvd["test"].texts) == (8, 4, 4)
    check_split_sizes(sizes, {"task": "retrieval", "batch_size_train": 4, "k_test": 2, "valid_splits": ["val"]}, 1)
    with pytest.raises(DataError, match="k_test=3 is larger than the 2 image"):
        check_split_sizes(sizes, {"task": "retrieval", "batch_size_train": 4, "k_test": 3, "valid_splits": ["val"],
                                  "evaluate": True}, 1)


def test_checks_name_every_bad_file(tmp_path):
    written = write_video_qa_dataset(tmp_path, **SMALL)
    name, section = merged_section(written)
    videos = Path(written["videos"])
    entries = json.loads(Path(written["annotations"]["train"][0]).read_text())
    first, second, third = (videos / e["video"] for e in entries[::2][:3])
    first.unlink()  # missing
    second.write_bytes(b"not a video")  # unreadable
    write_mp4(third, [np.zeros((SIZE, SIZE, 3), np.uint8)] * 2)  # fewer frames than requested
    with pytest.raises(VideoError) as error:
        check_video_datasets({name: section}, tmp_path)
    message = str(error.value)
    assert message.startswith("3 of 8 videos cannot be used")
    assert re.search(re.escape(str(first)) + ": video file not found", message)
    assert re.search(re.escape(str(second)) + ": cannot be read as a video", message)
    assert re.search(re.escape(str(third)) + r": has 2 frame\(s\), fewer than the 4 requested", message)
    data = build(written)  # and where a run meets one anyway, the error names it too
    index = next(i for i, e in enumerate(data["train"].annotation) if e["video"] == first.name)
    with pytest.raises(VideoError, match=re.escape(str(first)) + ": video file not found"):
        data["train"][index]


def test_checks_name_malformed_annotations_and_answer_lists(tmp_path):
    written = write_video_qa_dataset(tmp_path, **SMALL)
    name, section = merged_section(written)
    train = Path(written["annotations"]["train"][0])
    entries = json.loads(train.read_text())
    del entries[1]["answer"]
    train.write_text(json.dumps(entries, indent=1))
    malformed = re.escape(str(train)) + r":\d+: malformed annotation \(entry 1\): missing key 'answer'"
    with pytest.raises(DataError, match=malformed):
        check_video_datasets({name: section}, tmp_path)
    answers = Path(written["ans2label"])
    answers.write_text(json.dumps({"left": 0, "right": 2}))
    gap = re.escape(str(answers)) + r": labels must be 0..1, each once; label 1 is missing"
    with pytest.raises(DataError, match=gap):
        read_answer_list(answers)
    del section["vis_processor"]["eval"]["num_frames"]
    with pytest.raises(DataError, match=f"datasets.{name}.vis_processor: every processor needs num_frames"):
        check_video_datasets({name: section}, tmp_path)
