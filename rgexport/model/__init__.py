"""The export-friendly Griffin model: primitives (layers) -> blocks -> model (griffin), plus its state."""

from rgexport.model.griffin import Griffin
from rgexport.model.state import State, TensorSpec, dotted, identifier, init_state, state_bytes, state_spec

__all__ = ["Griffin", "State", "TensorSpec", "dotted", "identifier", "init_state", "state_bytes", "state_spec"]
