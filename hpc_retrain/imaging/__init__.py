"""Image arithmetic every stage shares: MISIC preprocessing, crop-and-stitch tiling, the block engine for large
images, and the instance metrics (matching, scores)."""
