"""`landcover labels`: the OpenStreetMap features of a preset -> a labels GeoPackage.

Polygons with `class` and `priority` (overlap order), the preset's style, and a
`landcover_info` table (source, preset, date, attribution) that the dataset
copies into its catalog.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shapely.geometry import mapping
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

from ..atomic import atomic_output, check_out_path
from ..errors import EngineError
from ..events import Reporter, StageResult
from ..imagery.aoi import AOI, reproject_geometries, utm_crs
from ..labels.read import write_info
from ..vector.geometry import polygonal

@dataclass(frozen=True)
class LabelsParams:
    aoi: AOI | None  # None: the whole OSM file
    preset: str
    out: Path
    osm_file: Path | None = None
    overpass: str | None = None  # Overpass API interpreter URL
    date: str | None = None  # Overpass [date:]: OSM as it was when the imagery was taken
    overpass_timeout: int = 180
    overpass_maxsize: int = 512 * 1024 * 1024
    cache_dir: Path | None = None
    backoff_s: float = 2.0


def check_overpass(params: LabelsParams) -> None:
    """An Overpass URL and limits that can make a request at all."""
    from urllib.parse import urlsplit

    url = urlsplit(str(params.overpass))
    if url.scheme not in ("http", "https") or not url.hostname or " " in url.netloc:
        raise EngineError("BAD_OVERPASS_URL", f"--overpass {params.overpass!r} is not an http(s) URL.",
                          "Give an Overpass API interpreter URL, e.g. https://overpass-api.de/api/interpreter")
    if params.overpass_timeout < 1 or params.overpass_maxsize < 1:
        raise EngineError("BAD_PARAMS", f"--overpass-timeout {params.overpass_timeout} and --overpass-maxsize "
                          f"{params.overpass_maxsize} must be positive.",
                          "Leave them out for the defaults (180 s, 512 MiB), or give e.g. --overpass-timeout 300.")


def build_labels(params: LabelsParams, reporter: Reporter) -> StageResult:
    """OSM features of a preset in the AOI -> polygons with `class` and `priority`, styled, attributed."""
    from ...contract.names import OSM_ATTRIBUTION as ATTRIBUTION
    from ..labels.osm import OverpassParams, fetch_overpass, read_osm_file
    from ..labels.presets import load_preset

    check_out_path(params.out, inputs=[params.osm_file])
    preset = load_preset(params.preset)
    if (params.osm_file is None) == (params.overpass is None):
        raise EngineError("NO_LABEL_SOURCE", "Give exactly one OSM source.",
                          "Use --osm-file FILE (.osm, .osm.bz2, .osm.pbf) or --overpass URL.")
    if params.overpass is not None:
        check_overpass(params)
    aoi = params.aoi.to_crs("EPSG:4326") if params.aoi is not None else None
    reporter.progress("labels", 0, 3, "reading OpenStreetMap")
    if params.overpass:
        if aoi is None:
            raise EngineError("NO_AOI", "An Overpass query needs an area.", "Give --aoi minx,miny,maxx,maxy.")
        osm_path = fetch_overpass(preset, OverpassParams(
            url=params.overpass, bbox=aoi.bounds, timeout_s=params.overpass_timeout,
            maxsize=params.overpass_maxsize, date=params.date, cache_dir=params.cache_dir,
            backoff_s=params.backoff_s), reporter.log)
        source = f"Overpass API {params.overpass}"
    else:
        osm_path, source = params.osm_file, f"OSM file {Path(params.osm_file).name}"
    read = read_osm_file(osm_path, preset)
    reporter.progress("labels", 1, 3, "building polygons")
    features = [f for f in read.features if aoi is None or f.geometry.intersects(aoi.geometry)]
    if not features:
        raise EngineError("NO_OSM_FEATURES", f"No OSM features of preset {preset.name} in this area.",
                          "Check the area (and --date), or pick another preset.")
    geoms, kept, counts, crs = _label_polygons(features, aoi.geometry if aoi is not None else None)
    if not geoms:
        raise EngineError("NO_OSM_FEATURES", f"No OSM features of preset {preset.name} in this area "
                          f"({len(features)} features, none with an area after clipping).",
                          "Check the area, or pick another preset.")
    reporter.progress("labels", 2, 3, "writing")
    info = {"source": source, "preset": preset.name, "date": params.date or "", "attribution": ATTRIBUTION,
            "created": _now()}
    _write_labels(params.out, geoms, kept, crs, preset, info)
    classes = {name: sum(f.class_name == name for f in kept) for name in preset.class_names}
    reporter.log(f"{len(kept)} labels ({', '.join(f'{k} {v}' for k, v in classes.items() if v)}); "
                 f"invalid geometries: {read.invalid + counts['skipped']} skipped, {counts['repaired']} repaired. "
                 f"Data {ATTRIBUTION} (ODbL).")
    reporter.progress("labels", 3, 3, "done")
    return StageResult(outputs={"labels": str(params.out)},
                       summary={"features": len(kept), "repaired": counts["repaired"],
                                "skipped": read.invalid + counts["skipped"],
                                **{f"class_{k}": v for k, v in classes.items()}})


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _local_utm(aoi: BaseGeometry | None, geoms: list) -> str:
    centre = (aoi if aoi is not None else unary_union([g.envelope for g in geoms])).centroid
    return utm_crs(centre.x, centre.y)


def _label_polygons(features: list, aoi: BaseGeometry | None) -> tuple[list, list, dict[str, int], str]:
    """Buffer lines/points by their rule's width (in metres, in the local UTM zone), repair
    invalid areas, clip to the AOI. Returns polygons (in that zone), their features, counts, the zone."""
    import shapely

    crs = _local_utm(aoi, [f.geometry for f in features])
    metric = reproject_geometries([f.geometry for f in features], "EPSG:4326", crs)
    clip = reproject_geometries([aoi], "EPSG:4326", crs)[0] if aoi is not None else None
    counts = {"repaired": 0, "skipped": 0}
    geoms, kept = [], []
    for feature, geom in zip(features, metric):
        if feature.buffer is not None:
            geom = geom.buffer(feature.buffer / 2, cap_style="flat" if geom.geom_type == "LineString" else "round")
        elif not geom.is_valid:
            geom = polygonal(geom)
            counts["repaired" if not geom.is_empty else "skipped"] += 1
        if clip is not None:
            geom = geom.intersection(clip)
        polygons = [g for g in getattr(geom, "geoms", [geom]) if g.geom_type == "Polygon" and not g.is_empty]
        if not polygons:
            continue
        geoms.append(shapely.MultiPolygon(polygons))
        kept.append(feature)
    return geoms, kept, counts, crs


def _write_labels(out: Path, geoms: list, features: list, crs: str, preset, info: dict[str, str]) -> None:
    import fiona

    from ..vector.styles import landcover_qml, write_styles

    schema = {"geometry": "MultiPolygon",
              "properties": {"class": "str", "priority": "int", "osm_id": "str"}}
    with atomic_output(out) as tmp:
        with fiona.open(tmp, "w", driver="GPKG", layer="labels", schema=schema, crs=crs) as dst:
            dst.writerecords({"geometry": mapping(g), "properties": {
                "class": f.class_name, "priority": f.priority, "osm_id": f.osm_id}} for g, f in zip(geoms, features))
        write_styles(tmp, {"labels": landcover_qml(preset.class_names, preset.class_colors)}, "landcover labels")
        write_info(tmp, info, describe={"labels": f"{preset.description}. Data {info['attribution']} (ODbL)."})
