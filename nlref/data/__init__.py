"""Data that ships with nlref or is made on the fly: images, a volume, a video."""

from .images import astronaut, camera, video, volume

__all__ = ["camera", "astronaut", "volume", "video"]
