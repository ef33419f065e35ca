"""avatar-pipeline: raw monocular portrait video to a controllable 4D head avatar."""

__version__ = "0.1.0"
