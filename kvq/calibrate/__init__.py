"""Calibration: run a model over data and record K/V statistics as the engine caches them."""

from kvq.calibrate.capture import StatsCache, masked_minmax
from kvq.calibrate.run import CalibrationConfig, CalibrationResult, calibrate, collect_stats, decoder_of

__all__ = [
    "CalibrationConfig",
    "CalibrationResult",
    "StatsCache",
    "calibrate",
    "collect_stats",
    "decoder_of",
    "masked_minmax",
]
