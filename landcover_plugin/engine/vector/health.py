"""Tree status thresholds (a light module: the CLI reads its defaults for --help)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HealthThresholds:
    """Status thresholds (documented in README, `landcover predict --help`)."""

    vari_stressed: float = 0.05  # green canopy has VARI ~0.1-0.4; yellowing ~0
    vari_dead: float = -0.05  # grey/brown crowns: red above green
    ndvi_stressed: float = 0.5
    ndvi_dead: float = 0.25
    dead_prob: float = 0.5  # mean dead-channel probability of a dead crown
