"""JadeCompact and its heads; loading a pretrained encoder."""

from pipeline.model.encoder_io import load_encoder, read_state_dict
from pipeline.model.jade import OUTPUT_KEYS, TASKS, WINDOW, JadeCompact, JadeConfig

__all__ = ["JadeCompact", "JadeConfig", "TASKS", "WINDOW", "OUTPUT_KEYS", "load_encoder",
           "read_state_dict"]
