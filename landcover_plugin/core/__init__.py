"""The plugin's non-GUI parts: finding and running the engine, loading results."""
