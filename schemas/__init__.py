"""Store schema v1, reason codes, validation, manifest and done marker. No Ray, no torch."""
