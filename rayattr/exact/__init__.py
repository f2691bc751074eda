"""Exact first-order values of a small run: its trajectory replayed in float64 and differentiated
end to end (docs/method.md §10). The reference that says, run by run and phase by phase, how far
the Data Value Embedding values hold.

replay.py        the run's arithmetic in float64, step by step
metagradient.py  the checkpointed reverse pass, and the values' agreement with it
run.py           `rayattr exact RUN`
limits.py        the checkpoint spacing (light: `rayattr plan` imports it)
"""
