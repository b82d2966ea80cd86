"""Pretraining: `stage` (the loop, its config and `run_pretrain`), `shards` (packed BOS-aligned token
rows and step-indexed batches) and `monitors` (loss health checks)."""

from ownlm.pretrain.stage import PretrainConfig, generate_text, run_pretrain

__all__ = ["PretrainConfig", "generate_text", "run_pretrain"]
