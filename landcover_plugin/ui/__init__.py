"""The plugin's widgets."""
