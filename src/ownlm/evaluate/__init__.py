"""Evaluation: scoring trained models on held-out tasks."""
