"""The stages in order on Ray: data, training with capture, embedding, reduce (stages), the
attribution of a recorded run (attribution: `rayattr attribute`), and the built-in job that runs
them all (job: `rayattr train`, jobs/pretrain_attr.py). Nothing is imported here: the stages
need Ray and torch, so each module is imported by name."""
