"""The LAVIS family's video architectures by name, importable without LAVIS (recipes are read in both
environments); the models themselves are in `video`."""

from __future__ import annotations

NUM_FRAMES = 8  # the published setting
VIDEO_ARCHITECTURES = {"blip_video_retrieval": "blip_retrieval", "blip_video_qa": "blip_vqa"}  # -> image architecture


def image_architecture(arch: str) -> str:
    """The image architecture a video architecture extends (its presets, settings and model types); other
    architectures are returned as they are.

    Parameters
    ----------
    arch : str
        ``blip_video_retrieval``, ``blip_video_qa``, or any other name.

    Returns
    -------
    str
    """
    return VIDEO_ARCHITECTURES.get(arch, arch)
