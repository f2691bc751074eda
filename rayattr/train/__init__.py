"""DeepSpeed ranks under Ray Train: worker (one rank's loop), backend (process group, DS config),
engine (the rank's DeepSpeed engine), trainer (the driver), checkpoints, progress and quiet.

Nothing is imported here: the trainer and the worker need Ray, so each module is imported by name.
"""
