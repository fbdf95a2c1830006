"""Calibration: run a model over data and record K/V statistics as the engine caches them."""

from kvq.calibrate.observer import StatsObserver, channel_minmax
from kvq.calibrate.run import CalibrationConfig, CalibrationResult, calibrate, collect_stats
from kvq.callable_package import make_callable

__all__ = [
    "CalibrationConfig",
    "CalibrationResult",
    "StatsObserver",
    "calibrate",
    "channel_minmax",
    "collect_stats",
]

make_callable(__name__)  # kvq.calibrate(...) is kvq.api.calibrate(...)
