"""Sfumato: text-to-image diffusion models served on NVIDIA Triton."""

__version__ = "0.1.0"
