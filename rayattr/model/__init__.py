"""The model side, below record and train: the model built from a config (build), the loss
training and attribution share (loss), and the final model with its test gradients (gradients).
Nothing is imported here: each module is imported by name."""
