"""The segment stage: a plate and a model in, OME-Zarr labels and probabilities out, with each field's state."""
