"""Attacking a fingerprinted model as a deployer would: fine-tuning, casts, quantization, merges, GGUF in llama.cpp, a deployer's data, and the adaptive host's serving-time filters."""
