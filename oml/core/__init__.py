"""The small core every stage uses: errors, files (atomic writes, caches), logs, the model registry, the run config (argument spec, presets, the run hash) and the run store (results/<hash>/)."""
