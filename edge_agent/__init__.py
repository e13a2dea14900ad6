"""Offline screening agent for dermoscopy images: decision support, never a diagnosis."""
__version__ = "0.1.0"
