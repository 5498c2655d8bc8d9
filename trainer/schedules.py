"""Training-size schedule: progressive resizing as FFCV's `get_resolution(epoch)`, a pure function of the epoch."""
from __future__ import annotations


def progressive_size(epoch: int, min_size: int, max_size: int, ramp_start: int, ramp_end: int,
                     multiple: int = 32) -> int:
    """Training image size of epoch `epoch` (0-based): `min_size` up to `ramp_start`, `max_size` from `ramp_end`.

    In between it rises linearly and is rounded to the nearest multiple of `multiple`
    (halves to even, as numpy rounds), FFCV's rule. Unlike FFCV, a rounded size is kept
    within [min_size, max_size], so endpoints that are not multiples are never overshot.
    """
    if not 0 < min_size <= max_size:
        raise ValueError(f"progressive sizes need 0 < MIN_SIZE <= image size, got {min_size} and {max_size}")
    if ramp_start > ramp_end:
        raise ValueError(f"the ramp must start before it ends, got epochs {ramp_start},{ramp_end}")
    if epoch <= ramp_start:
        return min_size
    if epoch >= ramp_end:
        return max_size
    size = min_size + (max_size - min_size) * (epoch - ramp_start) / (ramp_end - ramp_start)
    return min(max(round(size / multiple) * multiple, min_size), max_size)
