"""Compression and export: GGUF and clean HF exports with a parity card (quantization comes next)."""
