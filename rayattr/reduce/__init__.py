"""The reducer: values and aggregates from the segments' outputs (the segments chain among
themselves: rayattr/embed/segment.py, docs/method.md §4; the test gradients they are scored
against come from rayattr/model/gradients.py)."""

from rayattr.reduce.aggregate import write_outputs

__all__ = ["write_outputs"]
