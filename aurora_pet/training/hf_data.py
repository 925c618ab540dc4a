"""Datasets of the transformers family: what LAVIS's dataset classes make of the same annotation files
(``RetrievalDataset``, ``RetrievalEvalDataset``, ``COCOVQADataset``, ``COCOVQAEvalDataset``), over the entries
``data.read_datasets`` returns, with BLIP's image and text processing, batched for transformers' BLIP.

Processing follows LAVIS's BLIP processors: ``blip_image_eval`` resizes to ``image_size`` (bicubic);
``blip_image_train`` takes a random resized crop (scale ``min_scale``..``max_scale``) and a horizontal flip,
then torchvision's ``RandAugment(2, 5)`` (LAVIS has its own RandAugment over a slightly different set of
operations); both normalise with the checkpoint's image mean and std. ``blip_caption`` / ``blip_question``
clean text exactly as LAVIS's ``pre_caption`` / ``pre_question``.

VQA training: LAVIS weighs every distinct answer of a question by its frequency in its own loss; here the
model's own ``labels`` loss is trained on the most frequent answer (the first of equals).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from .data import SplitData

__all__ = ["Collate", "RetrievalEvalDataset", "RetrievalTrainDataset", "VQAEvalDataset", "VQATrainDataset",
           "build_dataset", "image_transform", "text_cleaner"]

Processed = Callable[[Image.Image], torch.Tensor]


def image_transform(cfg: Mapping[str, Any] | None, image_size: int, mean: list[float],
                    std: list[float]) -> Processed:
    """An image processor of the recipe (``vis_processor.train`` / ``.eval``); ``image_size`` when it gives none."""
    cfg = dict(cfg or {})
    size = int(cfg.get("image_size", image_size))
    if cfg.get("name", "blip_image_eval") == "blip_image_train":
        scale = (float(cfg.get("min_scale", 0.5)), float(cfg.get("max_scale", 1.0)))
        steps = [transforms.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC),
                 transforms.RandomHorizontalFlip(), transforms.RandAugment(2, 5)]
    else:
        steps = [transforms.Resize((size, size), interpolation=InterpolationMode.BICUBIC)]
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])


def text_cleaner(cfg: Mapping[str, Any] | None, task: str) -> Callable[[str], str]:
    """A text processor of the recipe (``text_processor.train`` / ``.eval``): LAVIS's ``pre_caption`` (with its
    ``prompt``) or ``pre_question``, truncated to ``max_words``; without a ``name``, the task's."""
    cfg = {"name": "blip_question" if task == "vqa" else "blip_caption", **(cfg or {})}
    max_words, prompt = int(cfg.get("max_words", 50)), str(cfg.get("prompt", ""))

    def truncate(text: str) -> str:
        words = text.split(" ")
        return " ".join(words[:max_words]) if len(words) > max_words else text

    def caption(text: str) -> str:
        text = re.sub(r"\s{2,}", " ", re.sub(r"([.!\"()*#:;~])", " ", text.lower()))
        return prompt + truncate(text.rstrip("\n").strip(" "))

    def question(text: str) -> str:
        return truncate(re.sub(r"([.!\"()*#:;~])", "", text.lower()).rstrip(" "))

    return question if cfg.get("name") == "blip_question" else caption


class _ImageDataset(Dataset):
    def __init__(self, data: SplitData, image: Processed, text: Callable[[str], str]) -> None:
        self.data, self.image, self.text = data, image, text

    def load(self, entry: Mapping[str, Any]) -> torch.Tensor:
        with Image.open(self.data.images / entry["image"]) as image:
            return self.image(image.convert("RGB"))


class RetrievalTrainDataset(_ImageDataset):
    """One item per caption: image, caption, and the image's index (first appearance of its ``image_id``), by
    which the loss keeps captions of the same image from being each other's negatives."""

    def __init__(self, data: SplitData, image: Processed, text: Callable[[str], str]) -> None:
        super().__init__(data, image, text)
        index: dict[Any, int] = {}
        self.image_index = [index.setdefault(e["image_id"], len(index)) for e in data.entries]

    def __len__(self) -> int:
        return len(self.data.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        entry = self.data.entries[i]
        return {"pixel_values": self.load(entry), "text": self.text(entry["caption"]), "image_ids": self.image_index[i]}


class RetrievalEvalDataset(_ImageDataset):
    """Items are images; ``texts`` are all captions in order and ``text_image[t]`` the image of caption t."""

    def __init__(self, data: SplitData, image: Processed, text: Callable[[str], str]) -> None:
        super().__init__(data, image, text)
        self.texts = [text(c) for e in data.entries for c in e["caption"]]
        self.text_image = [i for i, e in enumerate(data.entries) for _ in e["caption"]]

    def __len__(self) -> int:
        return len(self.data.entries)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.load(self.data.entries[i])


class VQATrainDataset(_ImageDataset):
    """One item per question, with its most frequent answer (see the module doc)."""

    def __len__(self) -> int:
        return len(self.data.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        entry = self.data.entries[i]
        answers = [entry["answer"]] if isinstance(entry["answer"], str) else entry["answer"]
        return {"pixel_values": self.load(entry), "text": self.text(entry["question"]),
                "answer": Counter(answers).most_common(1)[0][0]}


class VQAEvalDataset(_ImageDataset):
    """One item per question, with its ``question_id``."""

    def __len__(self) -> int:
        return len(self.data.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        entry = self.data.entries[i]
        return {"pixel_values": self.load(entry), "text": self.text(entry["question"]),
                "question_id": entry["question_id"]}


def build_dataset(data: SplitData, task: str, image: Processed, text: Callable[[str], str]) -> Dataset:
    """The dataset class of a split: training or evaluation, retrieval or VQA."""
    train = data.split == "train"
    if task == "retrieval":
        return (RetrievalTrainDataset if train else RetrievalEvalDataset)(data, image, text)
    return (VQATrainDataset if train else VQAEvalDataset)(data, image, text)


class Collate:
    """Batches of training items (retrieval, VQA) and VQA evaluation items: stacked images, texts tokenised to
    the batch's longest (at most ``max_length`` tokens), for VQA training the answers as decoder inputs and
    labels.

    ``enc_token_id`` replaces the first token of VQA questions (BLIP's ``[ENC]``, as LAVIS); retrieval passes it
    to the loss and the evaluation instead, which put it on ITM inputs only. Answers start with the decoder's
    ``bos_token_id`` (``[DEC]``), as LAVIS's and transformers' generation start; padded positions are -100 in
    ``labels``."""

    def __init__(self, tokenizer: Any, max_length: int, task: str, *, bos_token_id: int | None = None,
                 enc_token_id: int | None = None) -> None:
        self.tokenizer, self.max_length, self.task = tokenizer, max_length, task
        self.bos_token_id, self.enc_token_id = bos_token_id, enc_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        text = self.tokenizer([item["text"] for item in items], padding="longest", truncation=True,
                              max_length=self.max_length, return_tensors="pt")
        batch = {"pixel_values": torch.stack([item["pixel_values"] for item in items]),
                 "input_ids": text.input_ids, "attention_mask": text.attention_mask}
        if self.task == "retrieval":
            batch["image_ids"] = torch.tensor([item["image_ids"] for item in items])
            return batch
        if self.enc_token_id is not None:
            batch["input_ids"][:, 0] = self.enc_token_id
        if "question_id" in items[0]:
            batch["question_id"] = torch.tensor([item["question_id"] for item in items])
        if "answer" in items[0]:
            batch.update(self.answers([item["answer"] for item in items]))
        return batch

    def answers(self, answers: list[str]) -> dict[str, torch.Tensor]:
        """Answers as decoder inputs (``[DEC]`` first) and labels (padding -100)."""
        tokens = self.tokenizer(answers, padding="longest", return_tensors="pt")
        ids = tokens.input_ids.clone()
        ids[:, 0] = self.bos_token_id
        return {"decoder_input_ids": ids, "decoder_attention_mask": tokens.attention_mask,
                "labels": ids.masked_fill(tokens.attention_mask == 0, -100)}
