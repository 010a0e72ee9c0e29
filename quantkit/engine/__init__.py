"""The layer-wise engine: captures layer inputs, accumulates Hessians, drives the solvers."""

from quantkit.engine.layerwise import Calibration, calibrate_model

__all__ = ["Calibration", "calibrate_model"]
