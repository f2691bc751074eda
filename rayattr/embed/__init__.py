"""Segment actors: the DVEmb recursion over influence-checkpoint segments, run concurrently.

The package imports nothing itself, so its light modules (blocks, sums, cut) come without Ray:
the segment actor is rayattr.embed.segment.
"""
