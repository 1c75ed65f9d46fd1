"""Tree status thresholds (a light module: the CLI reads its defaults for --help).

What a status measures: the crown's greenness, VARI from red, green and blue, or NDVI
when the imagery has a near-infrared band; "dead" also when the model has a dead
channel and says so. Fixed thresholds do not transfer between scenes (a natural pine
stand read half "stressed" at VARI 0.05, issue 19), so by default a crown is judged
against its stand: stressed when its index lies more than `stand_stressed_sd` robust
standard deviations (1.4826 x the median absolute deviation) below the stand's median,
dead beyond `stand_dead_sd`. A threshold the user gives replaces the stand's.
"""
from __future__ import annotations

from dataclasses import dataclass

STATUSES = ("healthy", "stressed", "dead")
INDEX_NAMES = {"vari": "greenness (VARI)", "ndvi": "NDVI"}
MIN_STAND = 10  # fewer crowns: no stand to compare with, only the model's dead channel and the user's thresholds
MIN_SPREAD = 0.02  # robust SD floor: in an even stand, tiny differences are not stress


@dataclass(frozen=True)
class HealthThresholds:
    """Status thresholds (documented in README, `landcover predict --help`); None: relative to the stand."""

    vari_stressed: float | None = None
    vari_dead: float | None = None
    ndvi_stressed: float | None = None
    ndvi_dead: float | None = None
    dead_prob: float = 0.5  # mean dead-channel probability of a dead crown
    stand_stressed_sd: float = 2.0
    stand_dead_sd: float = 4.0


def stand_thresholds(index, kind: str, th: HealthThresholds) -> tuple[float | None, float | None]:
    """(stressed, dead) thresholds of index `kind` ("vari" or "ndvi") for a stand whose crowns
    have the values `index` (NaN: none): the user's where given, else from the stand."""
    import numpy as np

    stressed, dead = getattr(th, f"{kind}_stressed"), getattr(th, f"{kind}_dead")
    values = np.asarray(index, np.float64)
    values = values[np.isfinite(values)]
    if (stressed is None or dead is None) and len(values) >= MIN_STAND:
        median = float(np.median(values))
        spread = max(MIN_SPREAD, 1.4826 * float(np.median(np.abs(values - median))))
        stressed = median - th.stand_stressed_sd * spread if stressed is None else stressed
        dead = median - th.stand_dead_sd * spread if dead is None else dead
    return stressed, dead
