"""Labels: the user's label files, OpenStreetMap and its presets, masks for training."""
