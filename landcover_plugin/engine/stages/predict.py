"""`landcover predict`: a model over imagery (learn/inference.py), then styled vector layers.

Land cover and buildings are vectorized in blocks whose seams join exactly
(vector/vectorize.py); trees are outlined, measured and written block by block,
then fitted to their planting grid (vector/trees.py, vector/orchard.py). No
TensorFlow here (docs/DESIGN.md).
"""
from __future__ import annotations

import math
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import rasterio
from rasterio.windows import Window

from ..atomic import atomic_output, check_out_path, partial_prefix, remove_stale_partials
from ..errors import EngineError
from ..events import Reporter, StageResult
from ..imagery.aoi import AOI
from ..imagery.raster import open_raster, read_bands
from ..learn.detect import detect_trees
from ..learn.inference import (BATCH_SIZE, PROB_SCALE, aoi_window, check_imagery, classify_chips, fit_input_scale,
                              model_tiles, open_session, output_channels, predict_to_raster)
from ..learn.model_package import ModelInfo, onnx_path, read_info
from ..memory import fix_mmap_threshold
from ..vector.orchard import GridParams, orchard_from_points
from ..vector.styles import styles_for, write_styles
from ..vector.trees import HealthThresholds, TreeBlock, TreeParams, TreeRow, TreeWriter, block_trees
from ..vector.vectorize import (AREA_FIELD, BLOCK_SIZE, NODATA, GpkgWriter, Layer, TaggedWriter, blocks,
                               landcover_blocks, landcover_from_blocks, pixel_size_m)

GDAL_CACHE_BYTES = 32 * 2**20  # enough for a row of tiles of imagery blocks
TREE_MARGIN_M = 15.0  # context around a vectorization block: more than the widest crown's radius
MAX_BATCH_BYTES = 2 * 2**30  # one batch's model input: beyond this a typo, not a speed-up
MIN_BLOCK_SIZE = 16  # vectorization block side, pixels


@dataclass(frozen=True)
class PredictParams:
    model: Path
    imagery: Path
    out: Path
    aoi: AOI | None = None
    batch_size: int = BATCH_SIZE
    threads: int = 0  # onnxruntime intra-op threads; 0 = all cores
    block_size: int = BLOCK_SIZE  # vectorization block, pixels per side
    nir_band: int | None = None  # 1-based imagery band holding near infrared (else the model's)
    health: HealthThresholds = HealthThresholds()
    orchard: bool = True  # trees: look for a planting grid and missing trees
    grid: GridParams = GridParams()
    scheduler: str | None = None  # a Dask scheduler's address: predict on its workers (stages/predict_cluster.py)
    areas: tuple[tuple[str, AOI], ...] = ()  # (id, area): one result each, every row with its id (instead of aoi)


# --- vectorizing the prediction raster ----------------------------------------

def vectorize_landcover(pred: Path, info: ModelInfo, block_size: int, reporter: Reporter) -> list[Layer]:
    with rasterio.open(pred) as ds:
        read = lambda r0, c0, r1, c1: ds.read(1, window=Window(c0, r0, c1 - c0, r1 - r0))  # noqa: E731
        progress = lambda n, total: reporter.progress("vectorize", n, total, "blocks")  # noqa: E731
        return landcover_blocks(read, (ds.height, ds.width), ds.transform, ds.crs, info.class_names,
                                block_size=block_size, on_block=progress)


def tree_margin(transform, crs, height: int, width: int) -> int:
    """Pixels read around a tree block so that crowns cut by its border are whole."""
    return max(8, math.ceil(TREE_MARGIN_M / pixel_size_m(transform, crs, height, width)))


def tree_setup(src, info: ModelInfo, params: "PredictParams") -> tuple[TreeParams, int | None]:
    """The crown post-processing (the model was tuned with it: it travels in its metadata)
    and the 1-based NIR band of the imagery (None: none)."""
    nir = params.nir_band if params.nir_band is not None else info.nir_band
    if nir is not None and not 1 <= nir <= src.count:
        raise EngineError("BAD_IMAGERY_BANDS", f"NIR band {nir} does not exist in {src.name} ({src.count} bands).",
                          "Give --nir-band between 1 and the imagery's band count, or leave it out.")
    return TreeParams(threshold=info.threshold, min_area_m2=info.min_crown_m2,
                      seed_distance_m=info.seed_distance_m, health=params.health,
                      confidence_scale=info.confidence_scale, confidence_shift=info.confidence_shift), nir


def tree_block(data: np.ndarray, transform, core: tuple[slice, slice], src, img: Window,
               nir: int | None) -> TreeBlock:
    """A TreeBlock from the prediction raster's bands over a block and its margin, and
    the imagery's colour (and NIR) bands over the same pixels (`img`)."""
    return TreeBlock(
        prob=data[0] / PROB_SCALE, heat=data[1] / PROB_SCALE, valid=data[0] != NODATA, transform=transform,
        core=core, dead=data[2] / PROB_SCALE if data.shape[0] > 2 else None,
        rgb=read_bands(src, [1, 2, 3], window=img).astype(np.float64) if src.count >= 3 else None,
        nir=src.read(nir, window=img).astype(np.float64) if nir else None)


def tree_blocks(pred: Path, src, window: Window, info: ModelInfo, params: "PredictParams",
                reporter: Reporter) -> Iterator[list[TreeRow]]:
    """The trees of each block in turn; each block is read with a margin so that crowns
    cut by its border are whole (a tree belongs to the block holding its centre)."""
    with rasterio.open(pred) as ds:
        margin = tree_margin(ds.transform, ds.crs, ds.height, ds.width)
        tree_params, nir = tree_setup(src, info, params)
        plan = blocks(ds.height, ds.width, params.block_size)
        for n, (r0, c0, r1, c1) in enumerate(plan, start=1):
            e0, f0 = max(r0 - margin, 0), max(c0 - margin, 0)
            e1, f1 = min(r1 + margin, ds.height), min(c1 + margin, ds.width)
            win = Window(f0, e0, f1 - f0, e1 - e0)
            img = Window(f0 + window.col_off, e0 + window.row_off, f1 - f0, e1 - e0)
            block = tree_block(ds.read(window=win), ds.window_transform(win),
                               np.s_[r0 - e0:r1 - e0, c0 - f0:c1 - f0], src, img, nir)
            yield block_trees(block, ds.crs, tree_params)
            reporter.progress("vectorize", n, len(plan), "blocks")


def write_trees(found: Iterable[list[TreeRow]], params: "PredictParams", out: GpkgWriter,
                reporter: Reporter, nir: bool = False) -> dict:
    """Crowns and trees written block by block as they are found (outlined here or on a
    cluster, or a detector's boxes), so that memory stays flat with the area; their status
    set against the stand; then the orchard fitted to their points. Returns the summary."""
    trees = TreeWriter(out, nir=nir, health=params.health)
    for rows in found:
        trees.add(rows)
    thresholds = trees.finish()
    if trees.count:
        reporter.log(f"Tree status by {trees.kind}: " + ", ".join(
            f"{name} below {v:.3f}" for name, v in zip(("stressed", "dead"), thresholds) if v is not None)
            if any(v is not None for v in thresholds) else "too few crowns to compare with their stand")
    xy, area_m2, dead = trees.points()
    summary = {"crowns": trees.count, "canopy_m2": round(sum(area_m2.tolist()), 2), "dead": int(dead.sum())}
    if params.orchard:
        orchard = orchard_from_points(xy, area_m2, dead, out.crs, params.grid)
        for layer in orchard.layers:
            out.write(layer)
        summary |= {"missing_trees": orchard.missing, "orchard_blocks": orchard.grids}
        reporter.log(orchard.message)
    return summary


def buildings_layer(landcover: Layer, class_names: list[str]) -> Layer:
    """A buildings model is a segmentation whose first class is the background:
    layer `buildings` holds the polygons of the other class(es)."""
    rows = [(g, p) for g, p in landcover.rows if p["class"] != class_names[0]]
    return Layer("buildings", landcover.geometry, dict(landcover.fields), rows)


def check_params(params: PredictParams, info: ModelInfo) -> None:
    """Numbers predict cannot work with, refused before any work: a batch size of 0 or
    less ran no tile at all, and a huge one claimed more memory than the machine has."""
    batch_bytes = params.batch_size * info.band_count * info.tile_size ** 2 * 4  # float32 input
    most = max(1, MAX_BATCH_BYTES // (info.band_count * info.tile_size ** 2 * 4))
    if params.batch_size < 1 or batch_bytes > MAX_BATCH_BYTES:
        raise EngineError("BAD_PARAMS", f"--batch-size {params.batch_size} is out of range: 1 to {most} tiles "
                          f"of this model ({info.tile_size} px, {info.band_count} bands).",
                          f"Give e.g. --batch-size {min(BATCH_SIZE, most)}.")
    if params.block_size < MIN_BLOCK_SIZE:
        raise EngineError("BAD_PARAMS", f"--block-size {params.block_size} is below {MIN_BLOCK_SIZE} pixels.",
                          f"Give e.g. --block-size {BLOCK_SIZE} (larger blocks: fewer seams to mend, more memory).")
    if params.threads < 0:
        raise EngineError("BAD_PARAMS", f"--threads {params.threads} is negative.",
                          "Give the number of onnxruntime threads, or 0 for all cores.")


@contextmanager
def cluster_client(scheduler: str | None, inputs: list[Path], reporter: Reporter) -> Iterator:
    """A client of the Dask scheduler at `scheduler` whose workers read `inputs`, or None
    (this machine). Dask is imported only for a cluster run."""
    if scheduler is None:
        yield None
        return
    from ..cluster import check_workers, connect

    with connect(scheduler) as client:
        workers = check_workers(client, inputs)
        reporter.log(f"Predicting on the Dask cluster at {scheduler} ({workers} workers)")
        yield client


def cluster_run(client, params: PredictParams, info: ModelInfo, src, window: Window, aoi):
    """The prediction of the window as Dask tasks (stages/predict_cluster.py)."""
    from .predict_cluster import ClusterJob, ClusterRun

    trees, nir = tree_setup(src, info, params) if info.task == "trees" else (None, None)
    job = ClusterJob(model_file=onnx_path(params.model).resolve(), imagery=params.imagery.resolve(), info=info,
                     window=window, aoi=aoi, crs=src.crs, transform=src.window_transform(window),
                     channels=output_channels(info) if info.task == "trees" else 1, batch_size=params.batch_size,
                     threads=params.threads or 1, block_size=params.block_size, trees=trees, nir=nir)
    return ClusterRun(client, job, model_tiles(info, window, aoi))


def predict_area(params: PredictParams, info: ModelInfo, src, aoi: AOI | None, out: GpkgWriter, pred: Path,
                 session, client, reporter: Reporter) -> tuple[dict, int, set[str]]:
    """One area's layers into `out` (`pred`: where the local run's prediction raster goes).
    Returns its summary, the tiles the model ran on, and the cluster's workers that ran them."""
    window, aoi_px = aoi_window(src, aoi)
    layers: list[Layer] = []  # what is written whole at the end
    run = None
    if info.task == "classification":  # one polygon per chip: no prediction raster
        layers, tiles = classify_chips(session, src, info, window, aoi_px, reporter, params.batch_size)
        summary = {"chips": len(layers[0].rows), "hectares": {r["class"]: r["hectares"] for _, r in layers[1].rows}}
    elif info.detector:  # a peer's detector: its boxes are the crowns, no prediction raster
        plan = model_tiles(info, window, aoi_px)
        tiles = len(plan)
        summary = write_trees(detect_trees(session, src, info, window, aoi_px, plan, params.batch_size,
                                           params.health, reporter), params, out, reporter)
    else:
        if client is not None:  # the blocks' vectors come back from the cluster, in plan order
            run = cluster_run(client, params, info, src, window, aoi_px)
            tiles, results = len(run.tiles), run.results(reporter)
        else:
            tiles = predict_to_raster(session, src, info, window, aoi_px, pred, reporter, params.batch_size)
            reporter.log("Vectorizing the predictions")
        if info.task == "trees":
            summary = write_trees(results if run else tree_blocks(pred, src, window, info, params, reporter),
                                  params, out, reporter, nir=(params.nir_band or info.nir_band) is not None)
        else:
            layers = landcover_from_blocks(results, src.window_transform(window), src.crs, info.class_names) \
                if run else vectorize_landcover(pred, info, params.block_size, reporter)
            summary = {"hectares": {r["class"]: r["hectares"] for _, r in layers[1].rows},
                       "polygons": len(layers[0].rows)}
            if info.task == "buildings":
                layers = [buildings_layer(layers[0], info.class_names)] + layers[1:]
                summary["buildings"] = len(layers[0].rows)
    for layer in layers:
        out.write(layer)
    return summary, tiles, run.workers if run else set()


def predict(params: PredictParams, reporter: Reporter) -> StageResult:
    """Predict over the imagery (or its AOI, or each of its areas) and write the result GeoPackage with styles."""
    started = time.monotonic()
    check_out_path(params.out, inputs=[params.model, params.imagery])
    fix_mmap_threshold(1 << 20)  # tile-sized buffers: the RSS grew with the number of tiles
    info = read_info(params.model)
    check_params(params, info)
    on_cluster = params.scheduler is not None and info.task != "classification" and not info.detector
    if params.scheduler and not on_cluster:
        reporter.log("Chip classification and detectors run on this machine: --scheduler serves land cover, "
                     "buildings and trees segmentation models.", level="warning")
    session, provider = (None, "dask") if on_cluster else open_session(onnx_path(params.model), reporter,
                                                                         params.threads)
    params.out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(params.out)  # what killed runs left beside the output
    # The prediction raster lives next to the output and goes whatever happens (cancel included;
    # a kill leaves it, named with the pid for the next run to remove).
    # A bounded GDAL block cache: by default it grows to 5% of the RAM as the rasters
    # are read through, so the RSS would grow with the area.
    # The GeoPackage is written as it is made (trees block by block), all of it to a
    # temporary name that becomes the output only when complete.
    inputs = [onnx_path(params.model).resolve(), params.imagery.resolve()]
    with cluster_client(params.scheduler if on_cluster else None, inputs, reporter) as client, \
            rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), open_raster(params.imagery) as src, \
            tempfile.TemporaryDirectory(prefix=partial_prefix(params.out) + "-", dir=params.out.parent) as tmp, \
            atomic_output(params.out) as tmp_out:
        check_imagery(src, info, reporter)
        info = fit_input_scale(src, info, reporter)
        out = GpkgWriter(tmp_out, src.crs)
        summaries, tiles, workers = {}, 0, set()
        for n, (area_id, aoi) in enumerate(params.areas or ((None, params.aoi),), start=1):
            if params.areas:
                reporter.log(f"Area {area_id} ({n} of {len(params.areas)})")
            try:
                summary, area_tiles, area_workers = predict_area(
                    params, info, src, aoi, out if area_id is None else TaggedWriter(out, AREA_FIELD, area_id),
                    Path(tmp) / "prediction.tif", session, client, reporter)
            except EngineError as exc:  # one orchard of many off the imagery: the others are still wanted
                if not params.areas or exc.code != "AOI_OUTSIDE_IMAGERY":
                    raise
                reporter.log(f"Area {area_id} skipped: {exc.message}", level="warning")
                continue
            summaries[area_id], tiles, workers = summary, tiles + area_tiles, workers | area_workers
        if not summaries:
            raise EngineError("AOI_OUTSIDE_IMAGERY", f"None of the {len(params.areas)} areas overlaps "
                              f"{params.imagery}.", "Give areas over the imagery, or check their CRS.")
        nir = (params.nir_band or info.nir_band) is not None
        write_styles(tmp_out, styles_for(info, out.names, "ndvi" if nir else "vari"))
    summary = {"areas": len(summaries), "by_area": summaries} if params.areas else summaries[None]
    if on_cluster:
        summary["workers"] = len(workers)
    summary |= {"provider": provider, "tiles": tiles, "seconds": round(time.monotonic() - started, 2)}
    return StageResult(outputs={"gpkg": str(params.out)}, summary=summary)
