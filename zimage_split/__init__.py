"""zimage-split: Z-Image-Turbo as a split service (text encoder | DiT + VAE | client)."""

__version__ = "0.1.0"
