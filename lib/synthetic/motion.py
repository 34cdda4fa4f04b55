"""Synthetic talking-like FLAME motion sequences (docs/design.md, Motion sequences).

A motion is the dict of lib/dataset/motion.py, which reads and writes the motion files.

Shape legend: T frames.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d

from lib.dataset.motion import N_EXP, N_POSE, N_SHAPE

__all__ = ["make_motion"]

JAW_X = 6  # pose index of the jaw's opening rotation (x axis of joint 2)


def _smooth_noise(rng, n: int, dims: int, sigma_frames: float) -> np.ndarray:
    """Unit-std smooth noise: (n, dims), Gaussian-filtered white noise."""
    pad = int(4 * sigma_frames) + 1
    x = gaussian_filter1d(rng.normal(size=(n + 2 * pad, dims)), sigma_frames, axis=0)[pad:pad + n]
    return x / (x.std(axis=0, keepdims=True) + 1e-8)


def _bump(t: np.ndarray, start: float, duration: float) -> np.ndarray:
    """Raised cosine of height 1 over [start, start + duration]: (len(t),)."""
    s = np.clip((t - start) / duration, 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * s)


def _speech_jaw(rng, t: np.ndarray) -> np.ndarray:
    """Jaw opening (radians) per frame: syllables at 3-5 Hz in phrases separated by pauses."""
    jaw = np.zeros_like(t)
    now = rng.uniform(0.0, 0.2)
    end = t[-1] + 0.5
    while now < end:
        phrase_end = now + rng.uniform(1.0, 2.5)
        while now < phrase_end:
            dur = 1.0 / rng.uniform(3.0, 5.0)
            jaw = np.maximum(jaw, rng.uniform(0.04, 0.25) * _bump(t, now, dur))
            now += dur
        now += rng.uniform(0.25, 0.6)  # pause between phrases
    return jaw


def make_motion(n_frames: int = 150, fps: float = 30.0, seed: int = 0) -> dict:
    """A smooth talking-like sequence.

    Jaw: syllable-rate (3-5 Hz) openings of varying amplitude in phrases with pauses.
    Expression: slow smooth drift of the low-order components plus a few smooth expression
    events (e.g. smile/brow-raise-like bumps of random low-order directions), with a small
    jaw-correlated part (mouth shapes follow speech).
    Head: global and neck rotations of a few degrees; eyes: saccades between fixations
    (both eyes together, smooth 60 ms transitions) plus short blink-like expression bumps.

    Returns dict(expression (T, 50), pose (T, 15), shape (100,), fps) float32.
    """
    if n_frames < 1:
        raise ValueError(f"make_motion: n_frames must be >= 1, got {n_frames}")
    rng = np.random.default_rng(seed)
    T = int(n_frames)
    t = np.arange(T) / float(fps)
    fps = float(fps)

    shape = np.zeros(N_SHAPE)
    shape[:20] = rng.normal(0.0, 1.0, 20) * np.linspace(1.0, 0.3, 20)

    jaw = _speech_jaw(rng, t)

    decay = 1.0 / (1.0 + np.arange(N_EXP) / 4.0)
    expression = 0.4 * _smooth_noise(rng, T, N_EXP, sigma_frames=0.6 * fps) * decay
    mouth_dir = rng.normal(0.0, 1.0, N_EXP) * decay
    expression += np.outer(jaw / 0.25, 0.5 * mouth_dir / np.linalg.norm(mouth_dir))
    for _ in range(max(1, int(round(t[-1] / 2.0 + 1)))):  # roughly one event per 2 s
        direction = np.zeros(N_EXP)
        direction[:10] = rng.normal(0.0, 1.0, 10)
        direction *= rng.uniform(1.0, 2.5) / np.linalg.norm(direction)
        start = rng.uniform(-0.5, max(t[-1], 0.1))
        expression += np.outer(_bump(t, start, rng.uniform(0.8, 2.0)), direction)
    blink_dir = np.zeros(N_EXP)
    blink_dir[:10] = rng.normal(0.0, 1.0, 10)
    blink_dir *= 0.6 / np.linalg.norm(blink_dir)
    now = rng.uniform(0.5, 2.0)
    while now < t[-1] + 0.2:
        expression += np.outer(_bump(t, now, 0.2), blink_dir)
        now += rng.uniform(2.0, 4.5)

    pose = np.zeros((T, N_POSE))
    head = _smooth_noise(rng, T, 6, sigma_frames=0.8 * fps)
    pose[:, 0:3] = head[:, 0:3] * np.deg2rad([1.5, 2.5, 1.0])  # global: pitch, yaw, roll
    pose[:, 3:6] = head[:, 3:6] * np.deg2rad([1.0, 1.5, 0.7])  # neck
    pose[:, JAW_X] = jaw
    gaze = np.zeros((T, 2))
    target = rng.normal(0.0, 1.0, 2) * np.deg2rad([5.0, 8.0])
    now = rng.uniform(0.3, 1.5)
    gaze[:] = target
    while now < t[-1]:
        new = rng.normal(0.0, 1.0, 2) * np.deg2rad([5.0, 8.0])
        s = np.clip((t - now) / 0.06, 0.0, 1.0)
        s = s * s * (3.0 - 2.0 * s)
        gaze = gaze + np.outer(s, new - target)
        target = new
        now += rng.uniform(0.4, 1.8)
    for eye in (9, 12):  # left eye, right eye: pitch about x, yaw about y
        pose[:, eye] = gaze[:, 0]
        pose[:, eye + 1] = gaze[:, 1]

    return {"expression": expression.astype(np.float32), "pose": pose.astype(np.float32),
            "shape": shape.astype(np.float32), "fps": fps}
