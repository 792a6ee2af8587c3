"""Making fingerprints: fingerprint files, how a (prompt, response) pair becomes tokens, the generator."""
