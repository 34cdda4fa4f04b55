"""Who the persons of a synthetic data set are: identity, age, hair, colours, expressiveness.

Every person is a pure function of (seed, person number, population), so a run with more
identities makes the same first persons, and reruns reproduce them exactly.

Training persons (`draw_person(seed, p)`):

- identity: all N_SHAPE (100) coefficients of the head model's shape space, each
  N(0, spread^2): the model's shapedirs hold one standard deviation per column, so this is
  the population the model describes. The LEADING (20) coefficients, the model's largest
  components (its named proportions: head width, length and height, face length, jaw, nose,
  chin, cheeks, ears, ...), are drawn inside the TRAIN_QUANTILE (99 %) ball of their
  radius distribution and rescaled so that each keeps the standard deviation `spread`:
  the training population reaches into the tails up to the 99th percentile of
  "extremeness"; the out-of-distribution set lies beyond it.
- hair style: in every block of consecutive persons as long as the list of training styles,
  each training style appears exactly once (in a seeded order), so even a small population
  has every style, bald included; a hair length factor (log-normal) scales the volume.
- age in [0, 1] (older for bald and receding heads): forehead wrinkle depth and greying.
- skin tone anywhere between the palette's neighbouring tones, hair and iris colours from
  their palettes with a jitter, a beard (stubble to full) for about a third.
- expressiveness in [0.6, 1.4]: scales the expressions and jaw openings of the person's scans.

Out-of-distribution persons (`draw_person(seed, p, ood=True)`, their own random stream):
the held-out hair style (`ood_hair`, never drawn for training), a leading-identity radius of
1.15-1.5 times the largest the training draws can reach, and dyed hair colours that training
never uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2

from lib.synthetic.hair import HAIR_STYLES
from lib.synthetic.texture import HAIR_COLORS, IRIS_COLORS, SKIN_TONES

__all__ = ["Population", "draw_person", "draw_shape", "leading_radius", "N_SHAPE", "LEADING",
           "TRAIN_QUANTILE", "OOD_RADIUS", "DYED_COLORS"]

N_SHAPE = 100
LEADING = 20
TRAIN_QUANTILE = 0.99
OOD_RADIUS = (1.15, 1.5)  # OOD leading radius / the largest training one
DYED_COLORS = np.array([[0.15, 0.32, 0.75], [0.18, 0.58, 0.30], [0.85, 0.30, 0.62],
                        [0.52, 0.22, 0.72]])
GREY = np.array([0.80, 0.79, 0.77])
OLD_STYLES = ("bald", "receding")  # styles drawn with an older age

# random streams of SeedSequence([seed, stream, person, ...]); 2 / 4: the scans' own
STREAM_TRAIN, STREAM_OOD, STREAM_BLOCK = 1, 3, 5


@dataclass(frozen=True)
class Population:
    """How persons are drawn. spread: std of every identity coefficient; ood_hair: the hair
    style kept out of the training persons (the OOD persons all wear it)."""

    spread: float = 1.0
    ood_hair: str = "mohawk"

    def __post_init__(self):
        if not self.spread > 0:
            raise ValueError(f"Population: spread must be > 0, got {self.spread}")
        if self.ood_hair not in HAIR_STYLES:
            raise ValueError(f"Population: unknown ood_hair {self.ood_hair!r}; choose from "
                             f"{sorted(HAIR_STYLES)}")

    @property
    def train_styles(self) -> tuple[str, ...]:
        return tuple(s for s in HAIR_STYLES if s != self.ood_hair)


def _truncation():
    """(cutoff radius of the standard LEADING-dim normal, rescale restoring unit variance)."""
    r2 = chi2.ppf(TRAIN_QUANTILE, LEADING)
    var = chi2.cdf(r2, LEADING + 2) / chi2.cdf(r2, LEADING)  # E|z|^2 / LEADING inside the ball
    return float(np.sqrt(r2)), float(1.0 / np.sqrt(var))


def leading_radius(shape: np.ndarray, spread: float = 1.0) -> np.ndarray:
    """Extremeness of identities: the norm of the LEADING coefficients in units of the
    largest training draw. shape: (..., >= LEADING) -> (...) (<= 1 for every training
    person, >= OOD_RADIUS[0] for every OOD one)."""
    cut, scale = _truncation()
    lead = np.asarray(shape, dtype=np.float64)[..., :LEADING]
    return np.linalg.norm(lead, axis=-1) / (cut * scale * spread)


def draw_shape(rng: np.random.Generator, spread: float = 1.0, ood: bool = False) -> np.ndarray:
    """Identity coefficients (N_SHAPE,) float64 (module docstring)."""
    cut, scale = _truncation()
    z = rng.normal(size=N_SHAPE)
    lead = z[:LEADING]
    while np.linalg.norm(lead) > cut:  # training: inside the TRAIN_QUANTILE ball
        lead = rng.normal(size=LEADING)
    if ood:
        lead = lead / np.linalg.norm(lead) * cut * rng.uniform(*OOD_RADIUS)
    z[:LEADING] = lead * scale
    return z * spread


def _jitter(rng, colour, amount):
    return np.clip(np.asarray(colour) * rng.uniform(1 - amount, 1 + amount, 3), 0.0, 1.0)


def _block_style(seed: int, person: int, styles: tuple[str, ...]) -> str:
    """The training style of a 1-based person: one seeded order of `styles` per block."""
    block, pos = divmod(person - 1, len(styles))
    order = np.random.default_rng(np.random.SeedSequence([seed, STREAM_BLOCK, block]))
    return styles[int(order.permutation(len(styles))[pos])]


def draw_person(seed: int, person: int, population: Population = Population(),
                ood: bool = False) -> dict:
    """One person (1-based number) from (seed, person, population) alone.

    Returns dict(shape (N_SHAPE,) float32, age float, expressiveness float, style dict:
    hair, hair_scale, skin (3,), hair_color (3,), brow_color (3,), iris (3,), beard,
    wrinkles, seed) ready for
    `lib.synthetic.scans.make_scan`.
    """
    if person < 1:
        raise ValueError(f"draw_person: person numbers start at 1, got {person}")
    rng = np.random.default_rng(np.random.SeedSequence(
        [seed, STREAM_OOD if ood else STREAM_TRAIN, person]))
    shape = draw_shape(rng, population.spread, ood)
    hair = population.ood_hair if ood else _block_style(seed, person, population.train_styles)
    age = float(rng.beta(4.0, 2.0) if hair in OLD_STYLES else rng.beta(1.6, 1.6))
    tone = rng.uniform(0.0, len(SKIN_TONES) - 1)
    k = int(min(tone, len(SKIN_TONES) - 2))
    skin = SKIN_TONES[k] + (tone - k) * (SKIN_TONES[k + 1] - SKIN_TONES[k])
    natural = _jitter(rng, HAIR_COLORS[rng.integers(len(HAIR_COLORS))], 0.08)
    grey = np.clip((age - 0.65) / 0.3, 0.0, 1.0) * rng.uniform(0.5, 1.0)
    natural = natural + grey * (GREY - natural)
    # OOD: dyed scalp hair; brows and beard keep the natural colour
    hair_color = _jitter(rng, DYED_COLORS[rng.integers(len(DYED_COLORS))], 0.08) if ood \
        else natural
    beard = float(rng.uniform(0.25, 0.9)) if rng.uniform() < 0.35 else 0.0
    style = {
        "hair": hair,
        "hair_scale": float(np.clip(rng.lognormal(0.0, 0.2), 0.6, 1.6)),
        "skin": _jitter(rng, skin, 0.04),
        "hair_color": hair_color,
        "brow_color": natural,
        "iris": _jitter(rng, IRIS_COLORS[rng.integers(len(IRIS_COLORS))], 0.1),
        "beard": beard,
        "wrinkles": 0.4 + 1.8 * age,
        "seed": int(rng.integers(0, 2**31 - 1)),
    }
    return {"shape": shape.astype(np.float32), "age": age,
            "expressiveness": float(rng.uniform(0.6, 1.4)), "style": style}
