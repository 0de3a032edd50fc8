"""The prepare stage: labels from fluorescence, targets from brightfield, the training store, its layout and QC,
the measured cell width."""
