"""Segment actors: the DVEmb recursion over influence-checkpoint segments, run concurrently."""

from rayattr.embed.segment import FINAL_KIND, LOCAL_KIND, SegmentActor, SegmentSpec, SegmentWorker
from rayattr.embed.sums import SourcePhaseSums

__all__ = ["FINAL_KIND", "LOCAL_KIND", "SegmentActor", "SegmentSpec", "SegmentWorker", "SourcePhaseSums"]
