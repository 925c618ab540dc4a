"""BLIP on video in LAVIS (`aurora_pet.families.lavis.video`): one frame is the image model, frame order reaches
the text side only through τ, Aurora trains the factors and τ, retrieval scores equal a brute-force recomputation,
and (slow) a model that sees several frames learns the direction of motion that one frame cannot show."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lavis.common.config import Config
from lavis.common.registry import registry
from lavis.models.albef_models import compute_sim_matrix
from lavis.tasks.retrieval import RetrievalTask
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from aurora_pet.data.synthetic_video import DIRECTIONS, write_video_qa_dataset, write_video_retrieval_dataset
from aurora_pet.families.lavis import FAMILY
from aurora_pet.families.lavis.build import build_blip
from aurora_pet.families.lavis.video import (
    FRAME_EMBEDDING,
    BlipVideoQA,
    BlipVideoRetrieval,
    build_blip_video,
    video_sim_matrix,
    wrap_blip_video,
)
from aurora_pet.video import frame_rng, pixel_values, random_indices, read_frames, uniform_indices
from aurora_pet.video.lavis_data import aurora_datasets_config

SIZE = 32  # the tiny model's image size
CAPTIONS = ["a red circle moves left", "a blue square appears", "the green star goes up", "a yellow cross turns red"]
QUESTIONS = ["which way does the red circle move?", "what shape appears?"]


def videos(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, frames, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def pair(arch: str, num_frames: int = 1):
    """The tiny image model and the video model built from the same random draws (equal weights)."""
    image_arch = {"blip_video_retrieval": "blip_retrieval", "blip_video_qa": "blip_vqa"}[arch]
    torch.manual_seed(0)
    image = build_blip(image_arch, {"blip_retrieval": "flickr", "blip_vqa": "vqav2"}[image_arch], size="tiny")
    torch.manual_seed(0)
    video = build_blip_video(arch, "flickr" if image_arch == "blip_retrieval" else None, size="tiny",
                             num_frames=num_frames)
    return image, video


def retrieval_samples(visual: dict) -> dict:
    return {**visual, "text_input": CAPTIONS, "image_id": torch.tensor([3, 1, 2, 0]), "epoch": 0, "iters": 1,
            "num_iters_per_epoch": 10}


def vqa_samples(visual: dict) -> dict:
    return {**visual, "text_input": QUESTIONS, "answer": ["left", "right", "star"],
            "weight": torch.tensor([1., .5, 1.]), "n_answers": torch.tensor([2, 1])}


# -- one frame, τ = 0: the image model exactly ---------------------------------------------------------

def test_video_models_are_lavis_models_of_their_image_architecture():
    image, video = pair("blip_video_retrieval", num_frames=3)
    assert isinstance(video, BlipVideoRetrieval)
    assert registry.get_model_class("blip_video_retrieval") is BlipVideoRetrieval
    assert registry.get_model_class("blip_video_qa") is BlipVideoQA
    assert FAMILY.architecture(video) == "blip_retrieval"  # Aurora's presets apply unchanged
    assert set(video.state_dict()) == set(image.state_dict()) | {"frame_embedding.weight"}  # base names kept
    assert tuple(video.frame_embedding.weight.shape) == (3, 64) and not video.frame_embedding.weight.any()
    with pytest.raises(TypeError, match="needs a LAVIS BlipVQA"):
        BlipVideoQA.from_image_model(image)
    with pytest.raises(ValueError, match=r"num_frames=3\), got \(2, 2, 3, 32, 32\)"):
        video.encode_video(videos(2, 2))


@pytest.mark.parametrize("train", [True, False])
def test_one_frame_retrieval_is_the_image_model(train):
    image, video = pair("blip_video_retrieval")
    image.train(train), video.train(train)
    pixels = videos(4, 1)
    torch.manual_seed(1)  # dropout and the hard negatives draw from it, in the same order
    expected = image(retrieval_samples({"image": pixels[:, 0]}))
    torch.manual_seed(1)
    got = video(retrieval_samples({"video": pixels}))
    assert torch.equal(got.loss_itc, expected.loss_itc) and torch.equal(got.loss_itm, expected.loss_itm)
    for name in ("image_queue", "text_queue", "idx_queue", "queue_ptr"):  # the momentum features enqueued
        assert torch.equal(getattr(video, name), getattr(image, name)), name


def test_one_frame_scores_are_the_image_model():
    image, video = pair("blip_video_retrieval")
    image.eval(), video.eval()
    pixels = videos(5, 1)

    class Eval(torch.utils.data.Dataset):
        text, image = CAPTIONS + ["a purple diamond"], list(range(5))

        def __init__(self, key):
            self.key = key

        def __len__(self):
            return 5

        def __getitem__(self, i):
            return {self.key: pixels[i, 0] if self.key == "image" else pixels[i]}

    with torch.no_grad():
        expected = compute_sim_matrix(image, DataLoader(Eval("image"), batch_size=2), k_test=3)
        got = video_sim_matrix(video, DataLoader(Eval("video"), batch_size=2), k_test=3)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)


def test_one_frame_vqa_is_the_image_model():
    image, video = pair("blip_video_qa")
    image.eval(), video.eval()
    pixels = videos(2, 1)
    still, moving = {"image": pixels[:, 0]}, {"video": pixels}
    assert torch.equal(video(vqa_samples(moving)).loss, image(vqa_samples(still)).loss)
    answers = ["left", "right", "up", "down", "star", "red"]
    for method in ({"inference_method": "rank", "answer_list": answers, "num_ans_candidates": 4},
                   {"inference_method": "generate", "num_beams": 2, "max_len": 4}):
        expected = image.predict_answers({**still, "text_input": QUESTIONS}, **method)
        assert video.predict_answers({**moving, "text_input": QUESTIONS}, **method) == expected


# -- frame order reaches the text side only through τ --------------------------------------------------

@torch.no_grad()
def test_frame_order_matters_only_through_the_frame_embedding():
    _, video = pair("blip_video_qa", num_frames=4)
    video.eval()
    pixels = videos(2, 4)
    reverse = pixels.flip(1)

    def encoded(frames):
        samples = {"text_input": QUESTIONS, "image": frames}
        return video.forward_encoder(samples)[0].last_hidden_state, video.encode_video(frames).pooled

    (text, pooled), (text_rev, pooled_rev) = encoded(pixels), encoded(reverse)
    rounding = (text_rev - text).abs().max()
    assert rounding < 1e-5  # τ = 0: the frames are a set (the sums run in another order)
    torch.testing.assert_close(pooled_rev, pooled, atol=1e-6, rtol=1e-6)
    video.frame_embedding.weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    (text, pooled), (text_rev, pooled_rev) = encoded(pixels), encoded(reverse)
    assert (text_rev - text).abs().max() > max(100 * rounding, 1e-4)  # τ tells the order
    torch.testing.assert_close(pooled_rev, pooled, atol=1e-6, rtol=1e-6)  # ITC is a mean over frames: never


# -- Aurora on a video model ---------------------------------------------------------------------------

def test_training_steps_move_the_factors_and_the_frame_embedding():
    _, video = pair("blip_video_retrieval", num_frames=3)
    model = wrap_blip_video(video, rank=4)
    report = model.parameter_report()
    assert FRAME_EMBEDDING in report["heads"] and report["groups"]["heads"] >= 3 * 64
    assert report["heads"][:3] == ["itm_head", "vision_proj", "text_proj"]  # the preset's heads are kept
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(FRAME_EMBEDDING in n for n in trainable)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    for step in range(2):  # V = 0 at first: the first step moves V (and τ, the heads), the second the rest
        loss = model(retrieval_samples({"video": videos(4, 3, seed=step)})).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    still = sorted(n for n, p in trainable.items() if torch.equal(p, before[n]))
    assert not still, f"parameters that did not move: {still}"


# -- retrieval scores and recalls equal a brute-force recomputation ------------------------------------

def _builder_datasets(written: dict, num_frames: int, image_size: int = SIZE) -> dict:
    section = aurora_datasets_config(written, num_frames=num_frames, image_size=image_size)
    (name, _), = section.items()
    merged = Config.build_dataset_config({"datasets": section}).datasets[name]
    return registry.get_builder_class(name)(merged).build_datasets()


@torch.no_grad()
def _brute_force_scores(model, dataset, k_test: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair on its own: ITC similarity, and for each row's top k_test the ITM logit of "match" added."""
    frames = [model.encode_video(dataset[i]["video"][None]) for i in range(len(dataset))]
    video_feat = torch.cat([torch.nn.functional.normalize(model.vision_proj(f.pooled), dim=-1) for f in frames])
    text_feat, itm = [], np.zeros((len(frames), len(dataset.text)))
    for t, caption in enumerate(dataset.text):
        tokens = model.tokenizer([caption], padding="max_length", truncation=True, max_length=model.max_txt_len,
                                 return_tensors="pt")
        embeds = model.text_encoder.forward_text(tokens).last_hidden_state
        text_feat.append(torch.nn.functional.normalize(model.text_proj(embeds[:, 0]), dim=-1))
        ids = tokens.input_ids.clone()
        ids[:, 0] = model.tokenizer.enc_token_id
        for v, f in enumerate(frames):
            out = model.text_encoder(ids, attention_mask=tokens.attention_mask, encoder_hidden_states=f.tokens,
                                     encoder_attention_mask=torch.ones(f.tokens.shape[:-1], dtype=torch.long),
                                     return_dict=True)
            itm[v, t] = model.itm_head(out.last_hidden_state[:, 0])[0, 1]
    sims = (video_feat @ torch.cat(text_feat).t()).numpy()

    def rerank(s, m):
        out = np.full_like(s, -100.0)
        for row in range(s.shape[0]):
            top = np.argsort(-s[row])[:k_test]
            out[row, top] = s[row, top] + m[row, top]
        return out

    return rerank(sims, itm), rerank(sims.T, itm.T)


def _recalls(v2t: np.ndarray, t2v: np.ndarray, txt2img: dict, img2txt: dict) -> dict:
    """R@1/5/10 by hand: a video's rank is its best caption's; a caption's is its video's."""
    v_rank = [min(int((v2t[v] > v2t[v, t]).sum()) for t in img2txt[v]) for v in range(v2t.shape[0])]
    t_rank = [int((t2v[t] > t2v[t, txt2img[t]]).sum()) for t in range(t2v.shape[0])]
    return {f"{side}_r{k}": 100.0 * np.mean(np.array(ranks) < k) for side, ranks in (("txt", v_rank), ("img", t_rank))
            for k in (1, 5, 10)}


def test_retrieval_evaluation_equals_brute_force(tmp_path):
    written = write_video_retrieval_dataset(tmp_path, n_train=2, n_val=12, n_test=1, num_frames=8, image_size=SIZE,
                                            captions_per_video=2)
    dataset = _builder_datasets(written, num_frames=4)["val"]
    _, video = pair("blip_video_retrieval", num_frames=4)
    video.eval()
    # k_test = 10: every pair that R@10 can count is re-ranked (LAVIS orders the -100 ties arbitrarily)
    with torch.no_grad():  # τ ≠ 0 so that the frames' order enters the ITM scores too
        video.frame_embedding.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        got = video.compute_sim_matrix(DataLoader(dataset, batch_size=5), task_cfg=OmegaConf.create({"k_test": 10}))
    expected = _brute_force_scores(video, dataset, k_test=10)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=1e-5)
    registry.mapping["paths"]["output_dir"] = str(tmp_path)  # LAVIS's task appends its metrics to evaluate.txt
    try:
        metrics = RetrievalTask._report_metrics(*got, dataset.txt2img, dataset.img2txt)
    finally:
        registry.mapping["paths"].pop("output_dir")
    by_hand = _recalls(*expected, dataset.txt2img, dataset.img2txt)
    assert {k: metrics[k] for k in by_hand} == pytest.approx(by_hand)
    assert 0 < metrics["txt_r10"] and metrics["txt_r1"] < 100  # neither trivial nor empty


# -- time matters (slow): several ordered frames tell the direction one frame cannot -------------------

TIME_SEED, TIME_EPOCHS, TIME_FRAMES, SOURCE_FRAMES = 1, 36, 4, 16


def _decoded(written: dict, split: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
    entries = json.loads(Path(written["annotations"][split][0]).read_text())
    videos = {e["video"] for e in entries}
    root = Path(written["videos"])
    return entries, {v: pixel_values(read_frames(root / v, SOURCE_FRAMES, size=SIZE)) for v in videos}


def _train_and_score(num_frames: int, train: tuple, test: tuple) -> float:
    """A tiny BLIP VQA adapted with Aurora (text-attention, rank 32, τ trained) on direction questions; the frames
    of each sample drawn as the blip_video_train processor draws them; test accuracy over the four directions.

    The random tiny model is scaled as a trained one would be: unit-gain text layers (initializer_range = 1/√d; at
    BERT's 0.02 its tied word embeddings give logits too flat to answer with) and ViT position embeddings of the
    patch features' scale (at LAVIS's 0.02 a random ViT hardly says where a patch is, and a direction is a change
    of place)."""
    torch.manual_seed(TIME_SEED)
    model = build_blip_video("blip_video_qa", size="tiny", num_frames=num_frames, image_size=SIZE,
                             initializer_range=0.125)
    with torch.no_grad():
        model.visual_encoder.pos_embed.normal_(0, 1)
    model = wrap_blip_video(model, "text-attention", rank=32, dropout=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05)
    (entries, frames), (test_entries, test_frames) = train, test
    batch = 16
    for epoch in range(TIME_EPOCHS):
        model.train()
        order = np.random.default_rng([TIME_SEED, epoch]).permutation(len(entries))
        for start in range(0, len(order) - batch + 1, batch):
            rows = order[start:start + batch]
            clips = torch.stack([frames[entries[i]["video"]][random_indices(SOURCE_FRAMES, num_frames,
                                                                            frame_rng(TIME_SEED, epoch, int(i)))]
                                 for i in rows])
            loss = model({"video": clips, "text_input": [entries[i]["question"] for i in rows],
                          "answer": [entries[i]["answer"] for i in rows], "weight": torch.ones(batch),
                          "n_answers": torch.ones(batch, dtype=torch.long)}).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
    model.eval()
    with torch.no_grad():
        clips = torch.stack([test_frames[e["video"]][uniform_indices(SOURCE_FRAMES, num_frames)] for e in test_entries])
        answers = model.predict_answers({"video": clips, "text_input": [e["question"] for e in test_entries]},
                                        answer_list=list(DIRECTIONS), num_ans_candidates=len(DIRECTIONS))
    return float(np.mean([a == e["answer"] for a, e in zip(answers, test_entries)]))


@pytest.mark.slow
def test_time_matters_several_frames_beat_one(tmp_path):
    written = write_video_qa_dataset(tmp_path, kinds=("move",), n_train=96, n_val=1, n_test=48,
                                     num_frames=SOURCE_FRAMES, image_size=64, seed=0)
    train, test = _decoded(written, "train"), _decoded(written, "test")
    several, one = _train_and_score(TIME_FRAMES, train, test), _train_and_score(1, train, test)
    print(f"direction accuracy: {TIME_FRAMES} frames {several:.3f}, one frame {one:.3f}")
    assert several >= 0.85 and several - one >= 0.4, (several, one)
