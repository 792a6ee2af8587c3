"""OML 1.0 fingerprinting: shared code behind the three top-level scripts."""
