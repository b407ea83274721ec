"""revpers: face anonymization by reverse personalization (SDXL + IP-Adapter FaceID)."""

__version__ = "0.1.0"
