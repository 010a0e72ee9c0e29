"""The layer-wise engine: captures layer inputs, accumulates Hessians, drives the solvers."""

from quantkit.engine.comm import Comm, TorchComm
from quantkit.engine.driver import Calibration, calibrate_model
from quantkit.engine.layerwise import quantize_layer

__all__ = ["Calibration", "Comm", "TorchComm", "calibrate_model", "quantize_layer"]
