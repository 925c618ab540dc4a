"""Which frames of a video a model sees, reading them with decord, and checking videos before a run.

BLIP on video (as the method does it) looks at N frames: the video is cut into N equal segments and
evaluation takes each segment's middle frame, training one random frame from each segment, so over the
epochs training sees every part of every segment while evaluation stays deterministic. A training sample's
draw is seeded from the run's seed, the epoch and the sample's index (``frame_rng``). LAVIS's own
``load_video`` takes segment starts (uniform) or random frames from the two halves ("headtail"), clips N to
the video's length without a word, and resizes inside decord, whose scaler (0.6.0) returns wrongly shaped
frames for some small widths (16, 24, 48, 72 px seen: an error or a (16, 16, 6) frame; 224 and 384 are
fine). Here a video with fewer frames than requested is an error that names the file, and frames are
resized with torch.

decord is imported on first use, so the sampling functions also work where it is not installed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..training.data import DataError

PROGRESS_FROM = 100  # videos: fewer are checked too fast for a progress bar to help
CHECK_THREADS = os.cpu_count() or 1  # decoding is CPU-bound; decord's ctypes calls release the GIL
DECODE_CHUNK = 64  # frames decoded at once when checking every frame (a long video would not fit in memory)


class VideoError(DataError):
    """A video that is missing, cannot be decoded, or has fewer frames than requested."""


def segment_bounds(length: int, num_frames: int) -> np.ndarray:
    """The ``num_frames + 1`` boundaries of ``num_frames`` near-equal segments of ``range(length)``.

    Segment ``i`` is ``[b[i], b[i+1])`` with ``b[i] = floor(i * length / num_frames)``; none is empty when
    ``length >= num_frames``.

    Parameters
    ----------
    length : int
        Frames in the video.
    num_frames : int
        Segments (frames to sample), at least 1 and at most ``length``.

    Returns
    -------
    numpy.ndarray
        Integer boundaries, shape ``(num_frames + 1,)``, from 0 to ``length``.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if length < num_frames:
        raise ValueError(f"cannot sample {num_frames} frames from a video of {length}")
    return np.arange(num_frames + 1, dtype=np.int64) * length // num_frames


def uniform_indices(length: int, num_frames: int) -> np.ndarray:
    """The middle frame of each segment (evaluation): ``(b[i] + b[i+1]) // 2``.

    Parameters
    ----------
    length : int
        Frames in the video.
    num_frames : int
        Frames to sample.

    Returns
    -------
    numpy.ndarray
        Strictly increasing frame indices, shape ``(num_frames,)``.
    """
    bounds = segment_bounds(length, num_frames)
    return (bounds[:-1] + bounds[1:]) // 2


def random_indices(length: int, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """One frame drawn uniformly from each segment (training).

    Parameters
    ----------
    length : int
        Frames in the video.
    num_frames : int
        Frames to sample.
    rng : numpy.random.Generator
        The source of randomness; the same seed gives the same frames (for exact resumption, seed it from
        the run's seed, the epoch and the sample).

    Returns
    -------
    numpy.ndarray
        Strictly increasing frame indices, shape ``(num_frames,)``, index ``i`` in segment ``i``.
    """
    bounds = segment_bounds(length, num_frames)
    return rng.integers(bounds[:-1], bounds[1:])


def frame_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one training sample's frame choice: a function of the run's seed, the epoch and the
    sample's index only, so the frames do not depend on the data order, the number of loader workers or
    other draws, and a resumed run reads the frames an uninterrupted run would.

    Parameters
    ----------
    seed : int
        The run's seed.
    epoch : int
        The training epoch.
    index : int
        The sample's index in its dataset.

    Returns
    -------
    numpy.random.Generator
        Seeded from ``(seed, epoch, index)`` by NumPy's ``SeedSequence`` (independent streams per triple).
    """
    if min(seed, epoch, index) < 0:
        raise ValueError(f"frame_rng needs non-negative seed, epoch and index, got {(seed, epoch, index)}")
    return np.random.default_rng([seed, epoch, index])


def read_frames(path: str | Path, num_frames: int, *, size: int | tuple[int, int] | None = None,
                rng: np.random.Generator | None = None) -> torch.Tensor:
    """``num_frames`` RGB frames of a video, sampled per segment (see ``uniform_indices``).

    Parameters
    ----------
    path : str or Path
        The video file (anything decord's FFmpeg opens: mp4, avi, webm, ...).
    num_frames : int
        Frames to read; a video with fewer is a ``VideoError``.
    size : int or (int, int), optional
        Output ``(height, width)`` (an int: square), resized with antialiased bicubic interpolation as
        BLIP's image transforms resize (aspect ratio not kept); None keeps the video's size.
    rng : numpy.random.Generator, optional
        Training: one random frame per segment drawn from it. None (evaluation): each segment's middle.

    Returns
    -------
    torch.Tensor
        uint8, shape ``(num_frames, height, width, 3)``, in time order.

    Raises
    ------
    VideoError
        Naming the file: missing, empty, not decodable, or fewer than ``num_frames`` frames.
    """
    path = Path(path)
    reader = _open(path)
    length = len(reader)
    if length < num_frames:
        raise VideoError(f"{path}: {_too_short(length, num_frames)}")
    indices = uniform_indices(length, num_frames) if rng is None else random_indices(length, num_frames, rng)
    frames = _decode(reader, path, indices)
    return frames if size is None else _resize(frames, (size, size) if isinstance(size, int) else size)


def check_videos(paths: Sequence[str | Path], num_frames: int, *, all_frames: bool = False,
                 progress: bool = False) -> None:
    """Check every video up front, before a run reaches it; one error names every bad file.

    Each video must exist, open, hold at least ``num_frames`` frames, and decode its first and last
    frame (a download cut short fails there). ``all_frames`` decodes every frame instead: it also finds
    damage in the middle, at the cost of decoding the whole dataset once.

    Parameters
    ----------
    paths : sequence of str or Path
        The videos (duplicates are checked once).
    num_frames : int
        Frames the run reads from each video.
    all_frames : bool
        Decode every frame, not only the first and the last.
    progress : bool
        Show a progress bar when there are at least ``PROGRESS_FROM`` videos.

    Raises
    ------
    VideoError
        Listing each bad video with its path and what is wrong with it.
    """
    unique = list(dict.fromkeys(Path(p) for p in paths))
    with ThreadPoolExecutor(max_workers=CHECK_THREADS) as pool:
        results = tqdm(pool.map(lambda p: _video_problem(p, num_frames, all_frames), unique), total=len(unique),
                       desc="checking videos", leave=False, dynamic_ncols=True,
                       disable=not progress or len(unique) < PROGRESS_FROM)
        problems = [problem for problem in results if problem]
    if problems:
        raise VideoError(f"{len(problems)} of {len(unique)} videos cannot be used:\n  " + "\n  ".join(problems))


def _video_problem(path: Path, num_frames: int, all_frames: bool) -> str | None:
    """Why ``path`` cannot give ``num_frames`` frames, or None."""
    try:
        reader = _open(path)
        length = len(reader)
        if length < num_frames:
            return f"{path}: {_too_short(length, num_frames)}"
        chunks = np.array_split(np.arange(length), -(-length // DECODE_CHUNK)) if all_frames else \
            [np.array([0, length - 1])]
        for indices in chunks:
            _decode(reader, path, indices)
    except VideoError as error:
        return str(error)
    return None


def _too_short(length: int, num_frames: int) -> str:
    return f"has {length} frame(s), fewer than the {num_frames} requested"


def _open(path: Path) -> Any:
    """A decord ``VideoReader`` on one thread (data loader workers already run in parallel)."""
    import decord

    if not path.is_file():
        raise VideoError(f"{path}: video file not found")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file")
    try:
        return decord.VideoReader(str(path), num_threads=1)
    except Exception as error:  # noqa: BLE001  decord raises RuntimeError or DECORDError
        raise VideoError(f"{path}: cannot be read as a video ({_first_line(error)})") from None


def _decode(reader: Any, path: Path, indices: np.ndarray) -> torch.Tensor:
    try:
        batch = reader.get_batch(indices.tolist())
    except Exception as error:  # noqa: BLE001  decord raises DECORDError for a damaged stream
        raise VideoError(f"{path}: frames {_ranges(indices)} cannot be decoded ({_first_line(error)})") from None
    # decord returns its own array, or a torch tensor once something (LAVIS's data_utils) set the torch bridge
    return batch if isinstance(batch, torch.Tensor) else torch.from_numpy(batch.asnumpy())


def _resize(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(frames.shape[1:3]) == tuple(size):
        return frames
    pixels = frames.permute(0, 3, 1, 2).float()
    pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True, align_corners=False)
    return pixels.clamp_(0, 255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _first_line(error: Exception) -> str:
    """decord's message without its log prefix (``[12:00:00] /src/video/video_reader.cc:151: ``)."""
    lines = str(error).strip().splitlines()
    return re.sub(r"^(\[[\d:]+\] \S+:\d+: )+", "", lines[0])[:300] if lines else type(error).__name__


def _ranges(indices: np.ndarray) -> str:
    """``0-15`` for a run of consecutive indices, else the list."""
    values = indices.tolist()
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}-{values[-1]}"
    return ", ".join(map(str, values))
