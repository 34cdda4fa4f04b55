"""Inference with a trained GANHead (test.py): avatars, sampling, control, reenactment and
raw-scan fitting (docs/design.md, Inference). Import the submodules directly (no side effects
here)."""
