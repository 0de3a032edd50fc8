"""Files in and out: plate input (TIFF folders, OME-Zarr HCS), the NGFF writers and readers, atomic writes."""
