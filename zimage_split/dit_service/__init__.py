"""The generator service: Z-Image DiT + VAE (never the text encoder), served over gRPC."""
