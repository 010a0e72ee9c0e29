"""quantkit's version: the package's, the one its exports and calibration sets record."""

__version__ = "0.1.0"
