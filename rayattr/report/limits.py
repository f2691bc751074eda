"""How much a report's streaming passes hold at once: light (no matplotlib), so plan/estimate.py
imports the numbers report/html.py uses."""

SCAN_ROWS = 1 << 16  # occurrence rows a streaming pass over values/samples.parquet holds at once
MEDIAN_CAP = 1 << 20  # ratios a median's last pass collects at most (radix select, OccurrenceStats)
