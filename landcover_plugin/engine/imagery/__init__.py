"""Imagery: areas of interest, local rasters, XYZ/WMS sources over HTTP, the tile cache, mosaics."""
