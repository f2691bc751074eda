"""Recording from training frameworks: `hf` (transformers.Trainer's RecorderCallback)."""
