"""hpc_retrain: retrain the MISIC bacterial segmentation model on your own plates, locally or on Slurm.

Stages, one module each: ``labels`` (fluorescence -> training labels), ``targets`` (brightfield ->
features), ``store`` (the Zarr training set), ``train``, ``infer``, ``evaluate``; ``plate`` reads
plates, ``synth`` makes synthetic ones, ``config`` holds the one run configuration.
"""

__version__ = "0.1.0"
