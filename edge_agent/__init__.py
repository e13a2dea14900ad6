"""Offline screening agent for dermoscopy images: decision support, never a diagnosis."""
from . import runtime_env as _runtime_env

_runtime_env.apply()  # before anything can import onnxruntime or OpenCV: telemetry off, decoder limits set

__version__ = "0.1.0"
