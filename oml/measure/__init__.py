"""Measuring a fingerprinted model: the fingerprint check, likelihood benchmarks, the generation measures (generative QA, chat drift), the chat sample, the evaluation report and its cost plan."""
