"""Running MISIC: the model file and its pin, the engines, the tiled predictor, cell instances from probabilities."""
