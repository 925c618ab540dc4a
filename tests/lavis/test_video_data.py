"""Video data: frame sampling, decoding with decord and its checks, and the generated mp4 datasets loading
through LAVIS's own video builders, datasets and processors."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aurora_pet.data.synthetic_video import (
    ANSWER_LIST,
    BACKGROUND,
    COLORS,
    Clip,
    DIRECTIONS,
    lavis_video_datasets_config,
    render,
    vocabulary,
    write_mp4,
    write_video_qa_dataset,
    write_video_retrieval_dataset,
)
from aurora_pet.training.data import DataError
from aurora_pet.video import (
    VideoError,
    check_videos,
    encode_frames,
    pixel_values,
    random_indices,
    read_frames,
    segment_bounds,
    uniform_indices,
)

decord = pytest.importorskip("decord")
from lavis.common.config import Config  # noqa: E402
from lavis.common.registry import registry  # noqa: E402
from lavis.datasets.builders import base_dataset_builder  # noqa: E402

SIZE, FRAMES = 32, 16
SMALL = dict(n_train=3, n_val=2, n_test=2, image_size=SIZE, num_frames=FRAMES)
PALETTE = np.array([BACKGROUND, *COLORS.values()])  # index 0: background, then COLORS in order


# -- frame sampling ----------------------------------------------------------------------------------

@pytest.mark.parametrize("length, n", [(16, 8), (16, 16), (5, 4), (17, 3), (300, 8), (9, 1)])
def test_uniform_indices_are_segment_middles(length, n):
    bounds, indices = segment_bounds(length, n), uniform_indices(length, n)
    assert bounds[0] == 0 and bounds[-1] == length and (np.diff(bounds) >= 1).all()
    assert len(indices) == n and ((bounds[:-1] <= indices) & (indices < bounds[1:])).all()
    assert (np.abs(2 * indices - (bounds[:-1] + bounds[1:] - 1)) <= 1).all()  # the middle, rounded up
    assert uniform_indices(16, 8).tolist() == [1, 3, 5, 7, 9, 11, 13, 15]


def test_random_indices_cover_each_segment_and_are_seeded():
    length, n = 20, 6
    bounds = segment_bounds(length, n)
    rng = np.random.default_rng(0)
    draws = np.stack([random_indices(length, n, rng) for _ in range(400)])
    assert ((bounds[:-1] <= draws) & (draws < bounds[1:])).all()
    assert set(draws.ravel().tolist()) == set(range(length))  # every frame of every segment gets drawn
    same = [random_indices(length, n, np.random.default_rng(7)).tolist() for _ in range(2)]
    assert same[0] == same[1]
    assert any(random_indices(length, n, np.random.default_rng(s)).tolist() != same[0] for s in range(8, 12))


def test_sampling_rejects_impossible_requests():
    with pytest.raises(ValueError, match="cannot sample 8 frames from a video of 5"):
        uniform_indices(5, 8)
    with pytest.raises(ValueError, match="at least 1"):
        random_indices(5, 0, np.random.default_rng(0))


# -- generated videos --------------------------------------------------------------------------------

def _entries(written, split="train"):
    return json.loads(Path(written["annotations"][split][0]).read_text())


def _labels(frames: torch.Tensor) -> np.ndarray:
    """Each decoded pixel's nearest palette colour (0: background, 1..: COLORS in order)."""
    distance = ((frames.numpy()[..., None, :].astype(int) - PALETTE) ** 2).sum(-1)
    return distance.argmin(-1)


def _label(color: str) -> int:
    return 1 + list(COLORS).index(color)


def test_generated_videos_decode_to_their_frames(tmp_path):
    written = write_video_qa_dataset(tmp_path, **SMALL)
    videos = sorted(Path(written["videos"]).glob("*.mp4"))
    assert len(videos) == 7 and {e["video"] for e in _entries(written)} <= {v.name for v in videos}
    check_videos(videos, FRAMES, all_frames=True)
    assert len(decord.VideoReader(str(videos[0]))) == FRAMES
    frames = read_frames(videos[0], FRAMES)
    assert frames.dtype == torch.uint8 and tuple(frames.shape) == (FRAMES, SIZE, SIZE, 3)
    assert (_labels(frames)[:, 0, 0] == 0).all()  # background survives the codec
    assert tuple(read_frames(videos[0], 4, size=24).shape) == (4, 24, 24, 3)
    assert tuple(read_frames(videos[0], 4, size=(20, 28)).shape) == (4, 20, 28, 3)


def test_motion_is_visible_in_decoded_frames(tmp_path):
    written = write_video_qa_dataset(tmp_path, builder="msvd_qa", n_train=8, n_val=1, n_test=1, image_size=SIZE,
                                     num_frames=FRAMES, kinds=("move",), questions_per_video=1)
    for entry in _entries(written):
        color = re.match(r"(?:which way|where) does the (\w+) \w+", entry["question"]).group(1)
        labels = _labels(read_frames(Path(written["videos"], entry["video"]), FRAMES))
        ys, xs = np.stack([np.argwhere(frame == _label(color)).mean(0) for frame in labels]).T
        along = np.array(DIRECTIONS[entry["answer"]]) @ np.stack([xs, ys])  # position along the direction
        assert (np.diff(along) > -1).all() and along[-1] - along[0] > 0.4 * SIZE, entry
        across = np.array(DIRECTIONS[entry["answer"]][::-1]) @ np.stack([xs, ys])
        assert np.ptp(across) < 1.5, entry


def test_appearing_and_colour_changing_shapes_are_visible(tmp_path):
    written = write_video_qa_dataset(tmp_path, n_train=12, n_val=1, n_test=1, image_size=SIZE, num_frames=FRAMES,
                                     kinds=("appear", "turn"), seed=3)
    checked = set()
    for entry in _entries(written):
        question, answer = entry["question"], entry["answer"]
        if answer not in COLORS:  # "what shape appears?"
            continue
        labels = _labels(read_frames(Path(written["videos"], entry["video"]), FRAMES))
        before, after = (int((labels[t] == _label(answer)).sum()) for t in (0, -1))
        if question.endswith("at first?"):  # the colour that goes away
            before, after = after, before
        assert after > 10 and after > 4 * before, entry  # (a shape is ~30 px; the codec's edges leave a few)
        checked.add(question.split()[-1])
    assert checked == {"appears?", "turn?", "first?"}


@pytest.mark.parametrize("n", [1, 2, 8])
def test_direction_shows_only_in_the_order_of_frames(n):
    """The frames uniform sampling takes are, as a set, the same for opposite directions: one frame, or
    frames whose order is lost, cannot tell the direction."""
    indices = uniform_indices(FRAMES, n)
    clips = {d: Clip("move", "red", "circle", d, (0.52, 0.48), FRAMES // 2, "blue", "star", "top left")
             for d in DIRECTIONS}
    seen = {d: [render(clip, FRAMES, SIZE)[i].tobytes() for i in indices] for d, clip in clips.items()}
    for a, b in (("left", "right"), ("up", "down")):
        assert sorted(seen[a]) == sorted(seen[b])
        assert (seen[a] == seen[b]) == (n == 1)  # only the order differs
        assert seen[a] == seen[b][::-1]


def test_same_seed_same_bytes(tmp_path):
    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    for i, seed in enumerate((0, 0, 1)):
        write_video_qa_dataset(tmp_path / str(i), seed=seed, **SMALL)
        write_video_retrieval_dataset(tmp_path / str(i), builder="didemo_retrieval", seed=seed, **SMALL)
    assert files(tmp_path / "0") == files(tmp_path / "1")
    assert files(tmp_path / "0") != files(tmp_path / "2")


def test_captions_fit_one_video_and_use_the_vocabulary(tmp_path):
    texts = []
    for builder in ("msrvtt_retrieval", "didemo_retrieval"):
        written = write_video_retrieval_dataset(tmp_path, builder=builder, n_train=40, n_val=1, n_test=1,
                                                num_frames=4, image_size=16)
        owner = {}
        for entry in _entries(written):
            assert owner.setdefault(entry["caption"], entry["video"]) == entry["video"]
        texts += list(owner)
    written = write_video_qa_dataset(tmp_path, n_train=40, n_val=1, n_test=1, num_frames=4, image_size=16)
    texts += [e["question"] for e in _entries(written)] + ANSWER_LIST
    assert {w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)} == set(vocabulary())


# -- LAVIS's builders, datasets and processors on the generated files ----------------------------------

def _build(written, monkeypatch, num_frames=8):
    """LAVIS's builder on the recipe's merged config, with LAVIS's own video processor (its decord loader)."""

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"LAVIS tried to download {url}")

    monkeypatch.setattr(base_dataset_builder, "download_url", no_download)
    section = lavis_video_datasets_config(written)
    video = {"name": "alpro_video_eval", "n_frms": num_frames, "image_size": SIZE}
    text = {"name": "blip_question" if written["builder"].endswith("qa") else "blip_caption"}
    section[written["builder"]].update(vis_processor={"train": video, "eval": video},
                                       text_processor={"train": text, "eval": text})
    merged = Config.build_dataset_config({"datasets": section}).datasets[written["builder"]]
    return registry.get_builder_class(written["builder"])(merged).build_datasets()


@pytest.mark.parametrize("builder", ["msrvtt_retrieval", "didemo_retrieval"])
def test_retrieval_loads_through_lavis(builder, tmp_path, monkeypatch):
    written = write_video_retrieval_dataset(tmp_path, builder=builder, **SMALL)
    data = _build(written, monkeypatch)
    per_video = 3 if builder == "msrvtt_retrieval" else 1
    assert {s: len(d) for s, d in data.items()} == {"train": 3 * per_video, "val": 2, "test": 2}
    sample = data["train"][0]
    assert set(sample) == {"video", "text_input", "image_id"}
    assert tuple(sample["video"].shape) == (3, 8, SIZE, SIZE) and sample["image_id"] == 0
    assert data["train"][len(data["train"]) - 1]["image_id"] == 2  # one id per video, not per caption
    val = data["val"]
    assert tuple(val[1]["video"].shape) == (3, 8, SIZE, SIZE) and val[1]["index"] == 1
    assert len(val.text) == 2 * per_video and all(len(t) == per_video for t in val.img2txt.values())


@pytest.mark.parametrize("builder", ["msrvtt_qa", "msvd_qa"])
def test_qa_loads_through_lavis(builder, tmp_path, monkeypatch):
    written = write_video_qa_dataset(tmp_path, builder=builder, **SMALL)
    data = _build(written, monkeypatch)
    assert {s: len(d) for s, d in data.items()} == {"train": 6, "val": 4, "test": 4}
    assert data["train"].class_labels == {a: i for i, a in enumerate(ANSWER_LIST)}
    for split, dataset in data.items():  # no answer outside the list (LAVIS would label it len(list))
        assert all(entry["answer"] in dataset.class_labels for entry in _entries(written, split))
    sample = data["test"][0]
    assert set(sample) == {"video", "text_input", "answers", "question_id", "instance_id"}
    assert tuple(sample["video"].shape) == (3, 8, SIZE, SIZE)
    assert sample["answers"] == ANSWER_LIST.index(_entries(written, "test")[0]["answer"])


# -- bad input ---------------------------------------------------------------------------------------

def _bad_videos(tmp_path):
    """One video per way of being unusable, and a good one."""
    frames = [np.full((SIZE, SIZE, 3), 40 * t % 255, np.uint8) for t in range(FRAMES)]
    good = Path(write_mp4(tmp_path / "good.mp4", frames))
    data = good.read_bytes()
    bad = {"missing": tmp_path / "missing.mp4", "empty": tmp_path / "empty.mp4",
           "truncated": tmp_path / "truncated.mp4", "junk": tmp_path / "junk.mp4",
           "zeroed tail": tmp_path / "zeroed.mp4", "short": Path(write_mp4(tmp_path / "short.mp4", frames[:4]))}
    bad["empty"].write_bytes(b"")
    bad["truncated"].write_bytes(data[: len(data) // 2])
    bad["junk"].write_bytes(np.random.default_rng(0).bytes(2000))
    bad["zeroed tail"].write_bytes(_zero_bytes(data, 2 / 3, 1))  # as a preallocated download cut short
    return good, bad


def _zero_bytes(data: bytes, start: float, stop: float) -> bytes:
    """``data`` with a stretch of the mp4's frame data (OpenCV writes it before the index) zeroed."""
    mdat, moov = data.index(b"mdat") + 4, data.index(b"moov") - 4
    begin, end = (mdat + int((moov - mdat) * f) for f in (start, stop))
    return data[:begin] + bytes(end - begin) + data[end:]


def test_bad_videos_are_named(tmp_path):
    good, bad = _bad_videos(tmp_path)
    check_videos([good, good], FRAMES)
    messages = {
        "missing": "video file not found", "empty": "empty file", "truncated": "cannot be read as a video",
        "junk": "cannot be read as a video", "zeroed tail": "cannot be decoded",
        "short": "has 4 frame\\(s\\), fewer than the 16 requested",
    }
    for name, path in bad.items():
        named = re.escape(str(path)) + ".*" + messages[name]
        with pytest.raises(VideoError, match=named):
            check_videos([good, path], FRAMES)
        with pytest.raises(VideoError, match=named):
            read_frames(path, FRAMES, rng=np.random.default_rng(0))
    middle = tmp_path / "damaged_middle.mp4"
    middle.write_bytes(_zero_bytes(good.read_bytes(), 0.4, 0.5))
    with pytest.raises(VideoError, match=re.escape(str(middle)) + ": frames 0-15 cannot be decoded"):
        check_videos([middle], FRAMES, all_frames=True)
    with pytest.raises(DataError) as error:  # one error lists every bad video
        check_videos([good, *bad.values()], FRAMES)
    assert str(error.value).startswith("6 of 7 videos cannot be used") and str(good) not in str(error.value)


def test_reading_under_lavis_torch_bridge(tmp_path):
    """LAVIS's data_utils switches decord to torch tensors globally; reading must not depend on it."""
    written = write_video_qa_dataset(tmp_path, **SMALL)
    path = next(Path(written["videos"]).glob("*.mp4"))
    plain = read_frames(path, 8)
    decord.bridge.set_bridge("torch")
    try:
        assert torch.equal(read_frames(path, 8), plain)
    finally:
        decord.bridge.reset_bridge()


# -- into a LAVIS ViT --------------------------------------------------------------------------------

def test_frames_feed_a_lavis_vit_like_images(tmp_path):
    from lavis.processors.blip_processors import BlipImageEvalProcessor

    from aurora_pet.families.lavis.build import build_blip

    written = write_video_qa_dataset(tmp_path, **SMALL)
    paths = sorted(Path(written["videos"]).glob("*.mp4"))[:2]
    frames = torch.stack([read_frames(p, 4) for p in paths])  # (B, N, H, W, 3)
    video = pixel_values(frames)
    as_image = BlipImageEvalProcessor(image_size=SIZE)(Image.fromarray(frames[1, 2].numpy()))
    torch.testing.assert_close(video[1, 2], as_image)  # a frame is an image to BLIP

    vit = build_blip("blip_retrieval", "flickr", size="tiny").visual_encoder.eval()
    with torch.no_grad():
        out = encode_frames(vit, video)
        alone = vit(video[1, 2:3])  # one frame through the image model
    tokens = alone.shape[1]
    assert tuple(out.tokens.shape) == (2, 4 * tokens, 64) and tuple(out.pooled.shape) == (2, 64)
    torch.testing.assert_close(out.tokens[1, 2 * tokens:3 * tokens], alone[0], atol=1e-5, rtol=1e-5)
