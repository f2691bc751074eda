"""How much the final model's validation pass holds at once: light (no transformers), so
plan/estimate.py imports the number model/gradients.py uses."""

VALIDATION_ROWS = 256  # validation rows whose per-sample gradients are held at once
