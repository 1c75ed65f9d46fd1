"""`landcover predict`: a model over imagery (learn/inference.py), then styled vector layers.

Land cover and buildings are vectorized in blocks whose seams join exactly
(vector/vectorize.py); trees are outlined, measured and written block by block,
then fitted to their planting grid (vector/trees.py, vector/orchard.py). Trees
are a pipeline: each row of blocks goes to worker processes as soon as the model
has predicted it (and its margin), while the model goes on below. The model runs
as int8 where its quantized copy holds the accuracy (stages/quantize.py), on tiles
larger than its own where it can (learn/tile_size.py). No TensorFlow here
(docs/DESIGN.md).
"""
from __future__ import annotations

import math
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

from ..atomic import atomic_output, check_out_path, partial_prefix, remove_stale_partials
from ..errors import EngineError
from ..events import Reporter, StageResult
from ..imagery.aoi import AOI
from ..imagery.raster import open_raster, read_bands
from ..learn.detect import detect_trees
from ..learn.inference import (BATCH_SIZE, PROB_SCALE, aoi_window, check_imagery, classify_chips, fit_input_scale,
                              model_tiles, open_session, output_channels, predict_strips, predict_to_raster,
                              tiled_model)
from ..learn.model_package import INT8_ONNX_NAME, ModelInfo, onnx_path, read_info
from ..memory import fix_mmap_threshold
from ..vector.orchard import GridParams, orchard_from_points
from ..vector.styles import styles_for, write_styles
from ..vector.trees import HealthThresholds, TreeBlock, TreeParams, TreeRow, TreeWriter, block_trees
from ..vector.vectorize import (AREA_FIELD, BLOCK_SIZE, NODATA, GpkgWriter, Layer, TaggedWriter, block_runner, blocks,
                               landcover_blocks, landcover_from_blocks, pixel_size_m)

GDAL_CACHE_BYTES = 32 * 2**20  # enough for a row of tiles of imagery blocks
TREE_MARGIN_M = 15.0  # context around a vectorization block: more than the widest crown's radius
MAX_BATCH_BYTES = 2 * 2**30  # one batch's model input: beyond this a typo, not a speed-up
MIN_BLOCK_SIZE = 16  # vectorization block side, pixels
PRECISIONS = ("auto", "int8", "fp32")


@dataclass(frozen=True)
class PredictParams:
    model: Path
    imagery: Path
    out: Path
    aoi: AOI | None = None
    batch_size: int = BATCH_SIZE
    threads: int = 0  # onnxruntime intra-op threads; 0 = all cores
    precision: str = "auto"  # "auto": model-int8.onnx where it holds the accuracy; "int8"; "fp32"
    tile_size: int = 0  # model tile side; 0: THROUGHPUT_TILE where the model runs it (learn/tile_size.py)
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


@dataclass(frozen=True)
class TreeJob:
    """One tree block for a worker process: the prediction's bands over the block and its margin."""

    data: np.ndarray
    transform: object
    core: tuple[slice, slice]
    imagery: Path
    img: Window  # the same pixels in the imagery
    nir: int | None
    crs: object
    params: TreeParams


def job_trees(job: TreeJob) -> list[TreeRow]:
    """Worker: the trees whose centre lies in the block (the imagery read here, by its own handle)."""
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), open_raster(job.imagery) as src:
        block = tree_block(job.data, job.transform, job.core, src, job.img, job.nir)
    return block_trees(block, job.crs, job.params)


class RowBand:
    """The prediction's rows from the strips as they come, kept only while a block still needs them."""

    def __init__(self, channels: int):
        self.channels = channels
        self.strips: list[tuple[int, np.ndarray]] = []
        self.bottom = 0  # rows above this have arrived (a row of tiles outside the AOI arrives as NODATA)

    def add(self, r0: int, strip: np.ndarray) -> None:
        self.strips.append((r0, strip))
        self.bottom = r0 + strip.shape[1]

    def take(self, e0: int, f0: int, e1: int, f1: int) -> np.ndarray:
        out = np.full((self.channels, e1 - e0, f1 - f0), NODATA, np.uint8)
        for r0, strip in self.strips:
            a0, a1 = max(e0, r0), min(e1, r0 + strip.shape[1])
            if a1 > a0:
                out[:, a0 - e0:a1 - e0] = strip[:, a0 - r0:a1 - r0, f0:f1]
        return out

    def drop_above(self, row: int) -> None:
        self.strips = [(r0, s) for r0, s in self.strips if r0 + s.shape[1] > row]


def streamed_trees(session, src, info: ModelInfo, window: Window, aoi, tiles, params: "PredictParams",
                   reporter: Reporter) -> Iterator[list[TreeRow]]:
    """The trees of each block in plan order (each block read with a margin so that crowns cut by
    its border are whole: a tree belongs to the block holding its centre), without the prediction
    raster: each row of blocks is handed to worker processes as soon as the model has reached
    the bottom of its margin, so outlining and measuring overlap the model. Memory: the rows
    of one row of blocks and its margins, whatever the area's height."""
    height, width = int(window.height), int(window.width)
    transform = src.window_transform(window)
    margin = tree_margin(transform, src.crs, height, width)
    tree_params, nir = tree_setup(src, info, params)
    plan = blocks(height, width, params.block_size)
    band = RowBand(output_channels(info))

    def jobs() -> Iterator[TreeJob]:
        strips = predict_strips(session, src, info, window, aoi, tiles, reporter, params.batch_size)
        for k, (r0, c0, r1, c1) in enumerate(plan):
            e0, f0 = max(r0 - margin, 0), max(c0 - margin, 0)
            e1, f1 = min(r1 + margin, height), min(c1 + margin, width)
            while band.bottom < e1:
                band.add(*next(strips, (height, np.zeros((band.channels, 0, width), np.uint8))))
            yield TreeJob(band.take(e0, f0, e1, f1), transform * Affine.translation(f0, e0),
                          np.s_[r0 - e0:r1 - e0, c0 - f0:c1 - f0], params.imagery.resolve(),
                          Window(f0 + window.col_off, e0 + window.row_off, f1 - f0, e1 - e0), nir, src.crs,
                          tree_params)
            if k + 1 < len(plan):
                band.drop_above(plan[k + 1][0] - margin)
        for _ in strips:  # rows of tiles below the last block's margin (none: the plan covers the window)
            pass

    # The workers are forked here, before the model's read-ahead thread holds any of GDAL's locks.
    with block_runner(len(plan)) as run:
        for n, rows in enumerate(run(job_trees, jobs()), start=1):
            yield rows
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


def chosen_model(params: PredictParams) -> Path:
    """The model file predict runs: the folder's int8 copy (INT8_ONNX_NAME) where `landcover
    quantize --dataset` found that it holds the accuracy, or on request (--precision int8);
    else, or with --precision fp32, the model itself."""
    model = onnx_path(params.model)
    int8 = model.with_name(INT8_ONNX_NAME)
    if params.precision == "fp32" or model.name == INT8_ONNX_NAME:
        return model
    if params.precision == "int8" and not int8.is_file():
        raise EngineError("NO_INT8_MODEL", f"{model.parent} holds no int8 model ({INT8_ONNX_NAME}).",
                          f"Make one: landcover quantize --model {params.model} --imagery IMAGERY --dataset "
                          f"VALIDATION_DATASET --out {int8}; or leave out --precision int8.")
    if params.precision == "int8" or int8.is_file() and read_info(int8).metrics.get("int8_accuracy_holds") == 1:
        return int8
    return model


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
    if params.precision not in PRECISIONS:
        raise EngineError("BAD_PARAMS", f"Precision {params.precision!r} is not one of {', '.join(PRECISIONS)}.",
                          "Give --precision auto (the default), int8 or fp32.")
    if params.tile_size and params.tile_size <= 2 * info.tile_overlap:
        raise EngineError("BAD_PARAMS", f"--tile-size {params.tile_size} leaves nothing of the tile inside the "
                          f"model's overlap of {info.tile_overlap} px on each side.",
                          f"Give more than {2 * info.tile_overlap} (a multiple of 32 is safest), or leave it out.")
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
    job = ClusterJob(model_file=chosen_model(params).resolve(), imagery=params.imagery.resolve(), info=info,
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
        elif info.task == "trees":  # the model and the trees' blocks in a pipeline, no prediction raster
            plan = model_tiles(info, window, aoi_px)
            tiles, results = len(plan), streamed_trees(session, src, info, window, aoi_px, plan, params, reporter)
        else:
            tiles = predict_to_raster(session, src, info, window, aoi_px, pred, reporter, params.batch_size)
            reporter.log("Vectorizing the predictions")
        if info.task == "trees":
            summary = write_trees(results, params, out, reporter, nir=(params.nir_band or info.nir_band) is not None)
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
    model_file = chosen_model(params)
    info = read_info(model_file)
    check_params(params, info)
    on_cluster = params.scheduler is not None and info.task != "classification" and not info.detector
    if params.scheduler and not on_cluster:
        reporter.log("Chip classification and detectors run on this machine: --scheduler serves land cover, "
                     "buildings and trees segmentation models.", level="warning")
    if model_file.name == INT8_ONNX_NAME:
        reporter.log(f"Running the int8 model {model_file.name} (--precision fp32 runs {onnx_path(params.model).name})")
    own = info.tile_size
    model, info = tiled_model(model_file, info, params.threads, params.tile_size)
    if info.tile_size != own:  # --batch-size counts tiles of the model's own size: the same pixels per run
        params = replace(params, batch_size=max(1, params.batch_size * own ** 2 // info.tile_size ** 2))
        reporter.log(f"Tiles of {info.tile_size} px (the model's are {own} px; its overlap of {info.tile_overlap} px "
                     "is kept): fewer pixels run twice")
    session, provider = (None, "dask") if on_cluster else open_session(model, reporter, params.threads)
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
