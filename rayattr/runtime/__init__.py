"""The process around the computation, at the bottom of the layers: log records shown and
silenced (logs), the test seams (hooks), and joining Ray (cluster, which imports Ray only when
it connects). Nothing is imported here: each module is imported by name."""
