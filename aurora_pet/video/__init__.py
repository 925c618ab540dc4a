"""Video for BLIP, independent of the model family: which frames to read, reading and checking them
(``frames``, needs decord), encoding them with an image encoder and the learned frame embedding (``encode``),
QA's answer list and exact-match accuracy (``qa``), and a recipe's video datasets checked up front (``checks``).
``lavis_data`` (imported on its own: it needs LAVIS) registers LAVIS's video processors, dataset builders (their
defaults in ``configs/``) and the ``video_qa`` task; the models are ``aurora_pet.families.lavis.video``."""

from .encode import BLIP_MEAN, BLIP_STD, FrameEmbedding, FrameFeatures, encode_frames, pixel_values
from .frames import (
    VideoError,
    check_videos,
    frame_rng,
    random_indices,
    read_frames,
    segment_bounds,
    uniform_indices,
)

__all__ = ["BLIP_MEAN", "BLIP_STD", "FrameEmbedding", "FrameFeatures", "VideoError", "check_videos", "encode_frames",
           "frame_rng", "pixel_values", "random_indices", "read_frames", "segment_bounds", "uniform_indices"]
