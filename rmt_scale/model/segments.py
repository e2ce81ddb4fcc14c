"""Cutting a batch into segments."""

from __future__ import annotations


def segment_bounds(length: int, segment_size: int, alignment: str = "left") -> list[tuple[int, int]]:
    """``(start, end)`` of each segment of a sequence of ``length`` tokens.

    ``left`` fills segments from the first token, so only the last may be short; ``right`` fills them from
    the last token, so only the first may be short.
    """
    if length <= 0:
        raise ValueError("the input is empty: pass at least one token.")
    if alignment == "left":
        return [(start, min(start + segment_size, length)) for start in range(0, length, segment_size)]
    bounds = [(max(end - segment_size, 0), end) for end in range(length, 0, -segment_size)]
    return bounds[::-1]
