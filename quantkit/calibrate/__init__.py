"""Calibration as one job: job.py (CalibrationJob, its specs, build_job), preflight.py (the file checks before
the model loads), run.py (run_job, and calibrate_loaded: the in-memory entry) and cli.py (`quantkit calibrate`,
not imported here)."""

from quantkit.calibrate.job import (
    OPTIONS,
    CalibrationJob,
    DataSpec,
    ExportSpec,
    ModelSpec,
    QuantizationSpec,
    RunSpec,
    build_job,
)
from quantkit.calibrate.run import Outcome, calibrate_loaded, export_loaded, run_job

__all__ = [
    "OPTIONS",
    "CalibrationJob",
    "DataSpec",
    "ExportSpec",
    "ModelSpec",
    "Outcome",
    "QuantizationSpec",
    "RunSpec",
    "build_job",
    "calibrate_loaded",
    "export_loaded",
    "run_job",
]
