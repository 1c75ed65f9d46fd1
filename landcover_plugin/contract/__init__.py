"""What the QGIS plugin and the engine agree on, in one place.

Standard library only: imported by the plugin in QGIS's Python and by the
engine in its own environment. The tasks table (`tasks`), the pipeline file
(`pipeline_file`), the JSON-lines protocol and its runner (`protocol`,
`runner`) and shared names (`names`).
"""
