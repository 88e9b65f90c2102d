"""Data that ships with nlref or is made on the fly: images, a volume, a video, the two-sprite task,
the 2-D two-shape task."""

from .images import astronaut, camera, video, volume, waves
from .pairs2d import pair_images, pair_splits, position_aware_ceiling
from .sprites import additive_ceiling, sprite_clips, sprite_splits

__all__ = ["camera", "astronaut", "volume", "video", "waves", "sprite_clips", "sprite_splits", "additive_ceiling",
           "pair_images", "pair_splits", "position_aware_ceiling"]
