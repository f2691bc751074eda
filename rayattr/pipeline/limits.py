"""The pipeline's fan-out limits: light (no Ray), so plan/estimate.py imports the numbers the
stages use (pipeline/stages.py)."""

# at most this many validation shards: each loads the model once
MAX_VALIDATION_SHARDS = 16
