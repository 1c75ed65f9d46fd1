"""Vectors: predictions to polygons, crowns, trees and orchards, their measures and QGIS styles."""
