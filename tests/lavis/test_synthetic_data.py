"""The generated datasets load through LAVIS's own config merging, builders, datasets and VQA evaluator."""

import json
import os
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from aurora_pet.data import lavis_datasets_config, vocabulary, write_retrieval_dataset, write_vqa_dataset
from aurora_pet.data.synthetic import ANSWER_LIST, COLORS, SHAPES, validate_datasets_config

pytest.importorskip("lavis")
from lavis.common.config import Config  # noqa: E402
from lavis.common.registry import registry  # noqa: E402
from lavis.common.vqa_tools.vqa import VQA  # noqa: E402
from lavis.common.vqa_tools.vqa_eval import VQAEval  # noqa: E402
from lavis.datasets.builders import base_dataset_builder  # noqa: E402
from lavis.tasks.vqa import VQATask  # noqa: E402

SIZES = dict(n_train=4, n_val=3, n_test=2)


def _write(kind, root, **kw):
    if kind == "vqa":
        return write_vqa_dataset(root, **{**SIZES, **kw})
    return write_retrieval_dataset(root, style=kind, **{**SIZES, **kw})


def _merged(written, processors=None):
    """What a recipe does: its datasets section merged onto LAVIS's default yaml for the builder."""
    section = lavis_datasets_config(written)
    section[written["builder"]].update(processors or {})
    return Config.build_dataset_config({"datasets": section}).datasets


def _build(written, monkeypatch):
    """LAVIS's builder on the merged config, with its real processors at a small image size."""

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"LAVIS tried to download {url}")

    monkeypatch.setattr(base_dataset_builder, "download_url", no_download)
    text = "blip_question" if written["builder"] == "coco_vqa" else "blip_caption"
    processors = {"vis_processor": {"train": {"name": "blip_image_train", "image_size": 32},
                                    "eval": {"name": "blip_image_eval", "image_size": 32}},
                  "text_processor": {"train": {"name": text}, "eval": {"name": text}}}
    merged = _merged(written, processors)[written["builder"]]
    return registry.get_builder_class(written["builder"])(merged).build_datasets()


def _words(text):
    return re.findall(r"\w+|[^\w\s]", text)


@pytest.mark.parametrize("kind", ["flickr30k", "coco"])
def test_retrieval_loads_through_lavis(kind, tmp_path, monkeypatch):
    cache_root_existed = os.path.exists(registry.get_path("cache_root"))
    written = _write(kind, tmp_path)
    validate_datasets_config(lavis_datasets_config(written))
    data = _build(written, monkeypatch)

    assert {s: len(d) for s, d in data.items()} == {"train": 4 * 5, "val": 3, "test": 2}
    sample = data["train"][0]
    assert set(sample) == {"image", "text_input", "image_id", "instance_id"}
    assert tuple(sample["image"].shape) == (3, 32, 32)
    assert set(_words(sample["text_input"])) <= set(vocabulary())
    val = data["val"]
    assert tuple(val[0]["image"].shape) == (3, 32, 32) and len(val.text) == 3 * 5
    assert all(len(t) == 5 for t in val.img2txt.values())
    caption_images = {}  # no caption fits two images of a split, so recall is well defined
    for t, i in val.txt2img.items():
        assert caption_images.setdefault(val.text[t], i) == i
    assert os.path.exists(registry.get_path("cache_root")) == cache_root_existed


def test_vqa_loads_through_lavis_and_scores_with_its_evaluator(tmp_path, monkeypatch):
    written = _write("vqa", tmp_path, questions_per_image=3)
    validate_datasets_config(_merged(written))  # also takes the merged OmegaConf section
    data = _build(written, monkeypatch)

    assert {s: len(d) for s, d in data.items()} == {"train": 12, "val": 9, "test": 6}
    batch = data["train"].collater([data["train"][0], data["train"][1]])
    assert tuple(batch["image"].shape) == (2, 3, 32, 32) and batch["n_answers"].tolist() == [1, 1]
    assert set(data["val"][0]) == {"image", "text_input", "question_id", "instance_id"}

    task = VQATask(num_beams=1, max_len=5, min_len=1, evaluate=True, num_ans_candidates=8)
    task.build_datasets(SimpleNamespace(datasets_cfg=_merged(written)))  # finds the evaluation files
    assert set(task.ques_files) == set(task.anno_files) == {"val", "test"}
    assert task.answer_list == ANSWER_LIST

    truth = json.loads(Path(written["annotations"]["val"][0]).read_text())
    for predict, accuracy in ((lambda a: a, 100.0), (lambda a: "red" if a != "red" else "blue", 0.0)):
        result = tmp_path / f"result_{accuracy}.json"
        result.write_text(json.dumps([{"question_id": q["question_id"], "answer": predict(q["answer"][0])}
                                      for q in truth]))
        vqa = VQA(task.anno_files["val"], task.ques_files["val"])
        scorer = VQAEval(vqa, vqa.loadRes(str(result), task.ques_files["val"]), n=2)
        scorer.evaluate()
        assert scorer.accuracy["overall"] == accuracy


def test_same_seed_same_bytes(tmp_path):
    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    for i, seed in enumerate((0, 0, 1)):
        _write("vqa", tmp_path / str(i), seed=seed)
        _write("flickr30k", tmp_path / str(i), seed=seed)
    assert files(tmp_path / "0") == files(tmp_path / "1")
    assert files(tmp_path / "0") != files(tmp_path / "2")


def test_source_and_shifted_differ_in_what_they_show(tmp_path):
    def stats(domain):
        written = write_vqa_dataset(tmp_path / domain, domain=domain, n_train=40, n_val=1, n_test=1,
                                    questions_per_image=5)
        entries = json.loads(Path(written["annotations"]["train"][0]).read_text())
        pairs = {(c, s) for e in entries for c, s in re.findall(r"(\w+) (\w+)\?", e["question"])
                 if c in COLORS and s in SHAPES}
        counts = Counter(e["answer"][0] for e in entries if e["question"].startswith("how many"))
        image = Image.open(Path(written["images"], entries[0]["image"])).convert("L")
        return pairs, set(counts), image.getpixel((0, 0))

    (src_pairs, src_counts, src_bg), (new_pairs, new_counts, new_bg) = stats("source"), stats("shifted")
    assert src_pairs and new_pairs and not src_pairs & new_pairs
    assert {c for c, _ in src_pairs} == {c for c, _ in new_pairs} == set(COLORS)  # same words, new pairs
    assert src_counts == {"1", "2"} and new_counts == {"2", "3"}
    assert src_bg > 200 and new_bg < 100


def test_vocabulary_covers_all_generated_text(tmp_path):
    vocab = vocabulary()
    assert vocab == sorted(set(vocab))
    texts = []
    for domain in ("source", "shifted"):
        written = write_vqa_dataset(tmp_path / domain, domain=domain, **SIZES, questions_per_image=5)
        texts += [e["question"] for e in json.loads(Path(written["annotations"]["train"][0]).read_text())]
        texts += json.loads(Path(written["annotations"]["val"][1]).read_text())
        written = write_retrieval_dataset(tmp_path / domain, domain=domain, **SIZES)
        texts += [e["caption"] for e in json.loads(Path(written["annotations"]["train"][0]).read_text())]
    assert {w for t in texts for w in _words(t)} == set(vocab)


def test_missing_image_is_named(tmp_path, monkeypatch):
    written = _write("flickr30k", tmp_path)
    missing = Path(written["images"], "flickr30k-images/100000.jpg")
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        validate_datasets_config(lavis_datasets_config(written))
    data = _build(written, monkeypatch)  # LAVIS itself only notices when the sample is read
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        data["train"][0]


def test_malformed_or_missing_annotation_is_named(tmp_path):
    written = _write("vqa", tmp_path)
    section = lavis_datasets_config(written)
    bad = Path(written["annotations"]["val"][2])
    bad.write_text('{"questions": [')
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        validate_datasets_config(section)
    bad.unlink()
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        validate_datasets_config(section)
    del section["coco_vqa"]["build_info"]["annotations"]["train"]["url"]
    with pytest.raises(ValueError, match="one url per storage path"):
        validate_datasets_config(section)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="domain"):
        write_vqa_dataset(tmp_path, domain="target")
    with pytest.raises(ValueError, match="style"):
        write_retrieval_dataset(tmp_path, style="msrvtt")
    with pytest.raises(ValueError, match="distinct scenes"):
        write_retrieval_dataset(tmp_path, n_train=100_000)
