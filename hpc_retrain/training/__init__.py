"""The train stage: the loop, the tile data, the network and loss, checkpoints, history, validation, the run
folder, and jobs (inline, local, Slurm)."""
