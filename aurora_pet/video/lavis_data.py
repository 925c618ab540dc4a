"""The data side of BLIP on video in LAVIS: processors, datasets, builders and the video QA task, registered in
LAVIS's registry when this module is imported (``aurora_pet.families.lavis.video`` imports it).

Processors ``blip_video_train`` / ``blip_video_eval`` read ``num_frames`` frames with ``read_frames`` (random
within segments for training, segment middles for evaluation), resize them to ``image_size`` and normalise them
as BLIP's image processors do: a video is a ``(N, 3, H, W)`` tensor. There is no other augmentation: no
horizontal flip (it turns "moves left" into a wrong caption) and no crop (it could cut the moving object out
of some frames and not others).

Builders ``msrvtt_retrieval_aurora``, ``didemo_retrieval_aurora``, ``msrvtt_qa_aurora``, ``msvd_qa_aurora`` read
LAVIS's annotation files and layout for those datasets (their defaults: ``configs/<builder>.yaml``) into
datasets of our own, registered under their own names so that LAVIS's builders stay as they are. Ours differ
in two ways:

- a training sample's frames are drawn from ``frame_rng(run seed, epoch, index)`` (``set_frame_epoch``
  sets the epoch), so the frames do not depend on the data order or the loader workers and a resumed run
  reads the frames an uninterrupted one would. LAVIS's datasets call ``vis_processor(path)`` with nothing
  a seed could come from;
- QA samples carry the answer *string* (BLIP's decoder is trained on it, with weight 1 and one answer per
  question) where LAVIS's ``VideoQADataset`` returns ALPRO's class label; ``answer_list`` (from
  ``qa_ans2label.json``, ordered by label) is what LAVIS's VQA task ranks over.

The task ``video_qa`` is LAVIS's ``vqa`` task scored by exact match (MSRVTT-QA and MSVD-QA have one
ground-truth answer per question; the official VQA accuracy expects ten).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lavis.common.dist_utils import main_process
from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from lavis.datasets.builders.video_qa_builder import VideoQABuilder
from lavis.datasets.datasets.base_dataset import BaseDataset
from lavis.datasets.datasets.retrieval_datasets import VideoRetrievalDataset, VideoRetrievalEvalDataset
from lavis.processors.base_processor import BaseProcessor
from lavis.tasks.vqa import VQATask
from omegaconf import OmegaConf
from torch.utils.data import ChainDataset, ConcatDataset

from .encode import pixel_values
from .frames import frame_rng, read_frames
from .qa import exact_match_accuracy, read_answer_list

CONFIGS = Path(__file__).parent / "configs"  # each builder's default dataset config
NUM_FRAMES, IMAGE_SIZE = 8, 224  # the published setting


# -- processors ------------------------------------------------------------------------------------

class BlipVideoProcessor(BaseProcessor):
    """A video file to BLIP's input: ``(num_frames, 3, image_size, image_size)`` float pixels.

    Parameters
    ----------
    num_frames : int
        Frames per video.
    image_size : int
        Side of the square frames.
    """

    random_frames = False  # training draws one frame per segment; evaluation takes the segments' middles

    def __init__(self, num_frames: int = NUM_FRAMES, image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        self.num_frames, self.image_size = num_frames, image_size

    def __call__(self, path: str | Path, rng: np.random.Generator | None = None) -> torch.Tensor:
        """The frames of ``path``; ``rng`` draws them (training processors need it, see ``frame_rng``)."""
        if self.random_frames and rng is None:
            raise ValueError(f"{type(self).__name__} draws random frames: pass rng (the *_aurora datasets seed it "
                             f"from the run's seed, the epoch and the sample), reading {path}")
        return pixel_values(read_frames(path, self.num_frames, size=self.image_size,
                                        rng=rng if self.random_frames else None))

    @classmethod
    def from_config(cls, cfg: Any = None) -> "BlipVideoProcessor":
        cfg = cfg if cfg is not None else OmegaConf.create()
        return cls(num_frames=int(cfg.get("num_frames", NUM_FRAMES)), image_size=int(cfg.get("image_size", IMAGE_SIZE)))


@registry.register_processor("blip_video_train")
class BlipVideoTrainProcessor(BlipVideoProcessor):
    random_frames = True


@registry.register_processor("blip_video_eval")
class BlipVideoEvalProcessor(BlipVideoProcessor):
    pass


# -- datasets ----------------------------------------------------------------------------------------

class SeededFrames:
    """A dataset whose training frames are drawn from ``frame_rng(seed, epoch, index)``.

    ``seed`` is the run's (set by the builder), ``epoch`` is set before each epoch by ``set_frame_epoch``; both
    are plain attributes, read in the loader's workers, which copy the dataset when an epoch's iterator starts.
    """

    seed = 0
    epoch = 0
    vis_processor: Any
    vis_root: str

    def read_video(self, index: int, video: str) -> torch.Tensor:
        path = os.path.join(self.vis_root, video)
        if getattr(self.vis_processor, "random_frames", False):
            return self.vis_processor(path, rng=frame_rng(self.seed, self.epoch, index))
        return self.vis_processor(path)


class VideoRetrievalTrainDataset(SeededFrames, VideoRetrievalDataset):
    """LAVIS's ``VideoRetrievalDataset`` (one sample per caption, ``image_id`` per video) with seeded frames."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        ann = self.annotation[index]
        return {"video": self.read_video(index, ann["video"]), "text_input": self.text_processor(ann["caption"]),
                "image_id": self.img_ids[ann["video"]]}


class VideoQADataset(SeededFrames, BaseDataset):
    """MSRVTT-QA / MSVD-QA entries as BLIP's VQA reads them: the question, the answer string, and the answer list.

    Each sample is ``{"video", "text_input", "answer", "question_id"}``; ``collater`` adds BLIP VQA's ``weight``
    (1) and ``n_answers`` (1) per question.
    """

    def __init__(self, vis_processor: Any, text_processor: Any, vis_root: str, ann_paths: Sequence[str]) -> None:
        super().__init__(vis_processor, text_processor, vis_root, ann_paths)
        self.answer_list: list[str] | None = None

    def _build_class_labels(self, ans_path: str) -> None:
        """What LAVIS's ``VideoQABuilder.build`` calls with ``qa_ans2label.json``: the answer list to rank over."""
        self.answer_list = read_answer_list(ans_path)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ann = self.annotation[index]
        return {"video": self.read_video(index, ann["video"]), "text_input": self.text_processor(ann["question"]),
                "answer": ann["answer"], "question_id": ann["question_id"]}

    def collater(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {"video": torch.stack([s["video"] for s in samples]),
                "text_input": [s["text_input"] for s in samples],
                "answer": [s["answer"] for s in samples],
                "weight": torch.ones(len(samples)),
                "n_answers": torch.ones(len(samples), dtype=torch.long),
                "question_id": torch.tensor([s["question_id"] for s in samples])}


def aurora_datasets_config(written: Mapping[str, Any], *, num_frames: int = NUM_FRAMES,
                           image_size: int = IMAGE_SIZE) -> dict[str, Any]:
    """A recipe's ``datasets:`` entry that reads files written by ``aurora_pet.data.synthetic_video`` (or any
    dict of that shape) with our builder of the dataset and BLIP's video processors.

    Parameters
    ----------
    written : mapping
        What ``write_video_retrieval_dataset`` or ``write_video_qa_dataset`` returned.
    num_frames : int
        Frames the processors read per video.
    image_size : int
        Side of the frames the model sees.

    Returns
    -------
    dict
        ``{"<builder>_aurora": {"data_type", "build_info", "vis_processor"}}`` (the text processors are the
        builder's defaults).
    """
    from ..data.synthetic_video import lavis_video_datasets_config

    (builder, section), = lavis_video_datasets_config(written).items()
    frames = {"num_frames": num_frames, "image_size": image_size}
    section["vis_processor"] = {"train": {"name": "blip_video_train", **frames},
                                "eval": {"name": "blip_video_eval", **frames}}
    return {f"{builder}_aurora": section}


def set_frame_epoch(datasets: Any, epoch: int) -> None:
    """Tell every seeded video dataset in ``datasets`` which epoch is about to be read (call it before the epoch's
    loader iterator starts: LAVIS's runner creates it lazily, at the epoch's first batch).

    Parameters
    ----------
    datasets : Any
        A dataset, or mappings, sequences and ``ConcatDataset``/``ChainDataset`` of them: a runner's
        ``datasets`` before its loaders exist (``{name: {split: dataset}}``) and after (``{split: dataset}``,
        training datasets concatenated); others are ignored.
    epoch : int
        The epoch.
    """
    if isinstance(datasets, SeededFrames):
        datasets.epoch = epoch
    elif isinstance(datasets, Mapping):
        for item in datasets.values():
            set_frame_epoch(item, epoch)
    elif isinstance(datasets, (list, tuple, ConcatDataset, ChainDataset)):
        for item in datasets.datasets if isinstance(datasets, (ConcatDataset, ChainDataset)) else datasets:
            set_frame_epoch(item, epoch)


# -- builders ---------------------------------------------------------------------------------------

class _VideoBuilder:
    """Our datasets with the run's seed (LAVIS's ``Config`` registers itself as ``configuration``)."""

    def build(self) -> dict[str, Any]:
        datasets = super().build()  # type: ignore[misc]
        config = registry.get("configuration", no_warning=True)
        seed = int(config.run_cfg.get("seed", 0)) if config is not None else 0
        for dataset in datasets.values():
            if isinstance(dataset, SeededFrames):
                dataset.seed = seed
        return datasets


def _defaults(name: str) -> dict[str, str]:
    return {"default": str(CONFIGS / f"{name}.yaml")}


@registry.register_builder("msrvtt_retrieval_aurora")
class MSRVTTRetrievalBuilder(_VideoBuilder, BaseDatasetBuilder):
    train_dataset_cls = VideoRetrievalTrainDataset
    eval_dataset_cls = VideoRetrievalEvalDataset
    DATASET_CONFIG_DICT = _defaults("msrvtt_retrieval_aurora")


@registry.register_builder("didemo_retrieval_aurora")
class DiDeMoRetrievalBuilder(_VideoBuilder, BaseDatasetBuilder):
    train_dataset_cls = VideoRetrievalTrainDataset
    eval_dataset_cls = VideoRetrievalEvalDataset
    DATASET_CONFIG_DICT = _defaults("didemo_retrieval_aurora")


@registry.register_builder("msrvtt_qa_aurora")
class MSRVTTQABuilder(_VideoBuilder, VideoQABuilder):
    train_dataset_cls = eval_dataset_cls = VideoQADataset
    DATASET_CONFIG_DICT = _defaults("msrvtt_qa_aurora")


@registry.register_builder("msvd_qa_aurora")
class MSVDQABuilder(_VideoBuilder, VideoQABuilder):
    train_dataset_cls = eval_dataset_cls = VideoQADataset
    DATASET_CONFIG_DICT = _defaults("msvd_qa_aurora")



# -- task -----------------------------------------------------------------------------------------------

@registry.register_task("video_qa")
class VideoQATask(VQATask):
    """LAVIS's ``vqa`` task (answers ranked over the dataset's answer list, or generated), scored by exact match:
    ``agg_metrics`` = ``acc`` = the percentage of questions answered with their ground-truth string."""

    def valid_step(self, model: Any, samples: Mapping[str, Any]) -> list[dict[str, Any]]:
        predictions = super().valid_step(model, samples)
        for prediction, answer in zip(predictions, samples["answer"]):
            prediction["gt_answer"] = answer
        return predictions

    @main_process
    def _report_metrics(self, result_file: str, split: str) -> dict[str, float]:
        results = json.loads(Path(result_file).read_text())
        accuracy = exact_match_accuracy([r["answer"] for r in results], [r["gt_answer"] for r in results])
        metrics = {"agg_metrics": accuracy, "acc": accuracy}
        logging.info("%s: exact-match accuracy %.2f on %d questions", split, accuracy, len(results))
        with open(os.path.join(registry.get_path("output_dir"), "evaluate.txt"), "a") as handle:
            handle.write(json.dumps({split: metrics}) + "\n")
        return metrics
