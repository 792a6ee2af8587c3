"""Embedding fingerprints: the trainer, benign rows, sub-networks (LoRA, trainable layers), several ranks."""
