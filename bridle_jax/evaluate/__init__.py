"""Downstream evaluation: fine-tuning, linear probes, metrics, embeddings and the demo verdict."""
