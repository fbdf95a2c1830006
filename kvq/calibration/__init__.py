"""Calibration: run a model over data and record K/V statistics as the engine caches them."""

from kvq.calibration.consumer import StatsConsumer, channel_minmax
from kvq.calibration.pipeline import CalibrationConfig, CalibrationResult, collect_stats, run_calibration

__all__ = [
    "CalibrationConfig",
    "CalibrationResult",
    "StatsConsumer",
    "channel_minmax",
    "collect_stats",
    "run_calibration",
]
