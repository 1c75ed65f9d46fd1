"""The Landcover Processing provider (toolbox, modeler, batch, qgis_process)."""
