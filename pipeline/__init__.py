"""moola-pipeline: distributed multi-task training for the JadeCompact model family."""

__version__ = "0.1.0"
