"""The evaluate stage: scoring against reference masks, overlays, and cross-validation by field."""
