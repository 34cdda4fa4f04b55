"""Inference with a trained GANHead (test.py): avatars, sampling, control, reenactment and
raw-scan fitting (DESIGN §7). Import the submodules directly (no side effects here)."""
