"""Finding, reading, recognising and converting the weight files users have (see docs in checkpoints.md)."""
from .files import CheckpointError, cast_state_dict, find_weights_file, load_strict, read_json, read_state_dict, strip_prefixes

__all__ = ["CheckpointError", "cast_state_dict", "find_weights_file", "load_strict", "read_json", "read_state_dict", "strip_prefixes"]
