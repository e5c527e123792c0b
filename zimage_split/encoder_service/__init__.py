"""The text-encoder service: Qwen3 hidden states for Z-Image prompts, served over gRPC."""
