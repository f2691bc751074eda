"""How the data stage cuts its work: light (no Ray, no pandas), so plan/estimate.py imports the
numbers the stage uses (data/scan.py, data/stage.py)."""

# Rows per record batch of a scan: bounds what one step of the scan holds.
BATCH_ROWS = 4096
# Rows a read task reads at least (consecutive files grouped): few tasks for many small files.
TASK_ROWS = 1 << 16
# Ids per hash bucket of the uniqueness check, about: buckets = rows / this, at most the CPUs.
BUCKET_IDS = 1 << 22
