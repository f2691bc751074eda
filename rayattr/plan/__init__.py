"""`rayattr plan`: what a run will cost before it starts (estimate: sizes, times, memory, and the
command line). Nothing is imported here: the estimates need torch, so the module is imported by name."""
