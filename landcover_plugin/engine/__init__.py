"""The landcover engine: plain Python, run in its own virtual environment.

It must never import `qgis`: it runs as the `landcover` command, in a separate
process from QGIS (TensorFlow and QGIS cannot share one; see docs/DESIGN.md).
`cli.py` is the command; `stages/` its subcommands, built from `imagery/`,
`labels/`, `learn/` and `vector/` (docs/ARCHITECTURE.md).
"""
