"""Video for BLIP, independent of the model family: which frames to read, reading and checking them
(``frames``, needs decord), and encoding them with an image encoder (``encode``)."""

from .encode import BLIP_MEAN, BLIP_STD, FrameFeatures, encode_frames, pixel_values
from .frames import (
    VideoError,
    check_videos,
    random_indices,
    read_frames,
    segment_bounds,
    uniform_indices,
)

__all__ = ["BLIP_MEAN", "BLIP_STD", "FrameFeatures", "VideoError", "check_videos", "encode_frames", "pixel_values",
           "random_indices", "read_frames", "segment_bounds", "uniform_indices"]
