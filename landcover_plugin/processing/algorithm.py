"""landcover:mapfromimagery — the whole pipeline as a Processing algorithm.

The same engine run as the dock's, synchronous: Processing already runs the
algorithm in a background task (toolbox), in the modeler, in batch mode and
in `qgis_process.bin run landcover:mapfromimagery -- ...`.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransformContext, QgsGeometry, QgsProcessing,
                       QgsProcessingAlgorithm, QgsProcessingContext, QgsProcessingException,
                       QgsProcessingOutputMultipleLayers, QgsProcessingParameterDefinition, QgsProcessingParameterEnum,
                       QgsProcessingParameterExtent, QgsProcessingParameterField, QgsProcessingParameterFile,
                       QgsProcessingParameterFileDestination, QgsProcessingParameterNumber,
                       QgsProcessingParameterRasterLayer, QgsProcessingParameterString,
                       QgsProcessingParameterVectorLayer, QgsProject, QgsRasterLayer, QgsRectangle, QgsSettings)

from qgis.PyQt.QtCore import QCoreApplication, QThread

from ..contract.names import OVERPASS_DEFAULT
from ..contract.pipeline_file import PipelineFile
from ..contract.runner import EngineFailed
from ..contract.tasks import TASK_IDS, TASKS, presets_for_task, read_presets
from ..contract.tasks import task as task_info
from ..core import job
from ..core.engine_env import check_engine
from ..core.layers import (area_hectares, class_hectares_text, gpkg_layer_names, group_name, model_label,
                           open_result_layers)
from ..core.print_layout import build_layout, export_map, layer_credit
from ..core.locate import engine_location
from ..core.remote_hosts import RemoteHost, load_hosts
from ..core.sources import ImagerySource, SourceError, labels_for_engine, raster_layer_source, xyz_connections
from ..core.task import summary_text

# Processing's dialog makes every line of the help a paragraph: one line per paragraph.
HELP = "\n".join((
    "<p>Maps trees (one polygon per crown, one point per tree), land cover (polygons with a <i>class</i> field "
    "and a table of hectares per class), buildings (footprints) or land cover per chip (one class per square "
    "chip, for very large areas) from imagery, in the Landcover engine's own environment (never in QGIS's "
    "Python).</p>",
    "<p><b>Imagery</b>: a raster layer (a local file, an XYZ or WMS layer; the project's first raster file is "
    "chosen to start with), or under Advanced an <b>XYZ tile URL</b> template such as "
    "<code>https://tiles.example.org/{z}/{x}/{y}.png</code> or the name of a saved XYZ connection, fetched for "
    "the area at the <b>resolution</b> given (m/px; empty: the engine picks); a URL, when given, is used "
    "instead of the layer. Credentials of a layer's or a saved connection's authentication configuration "
    "reach the engine through its environment only.</p>",
    "<p><b>Area</b>: the extent to map (and to train on). Without a CRS it is taken to be in the imagery "
    "layer's CRS, or WGS84 for XYZ tiles.</p>",
    "<p><b>Training labels</b>: a vector layer (crowns for trees; polygons with a <b>class field</b> for land "
    "cover, per chip too; building polygons for buildings), or under Advanced a DeepForest CSV of crown boxes "
    "(<b>labels file</b>). A model is trained on them for <b>epochs</b> passes. Or choose <i>None: predict "
    "with a model file</i> and give an existing <b>model</b> (.onnx) to predict without training.</p>",
    "<p><b>Labels from</b> OpenStreetMap instead: choose <i>OpenStreetMap (Overpass)</i> to query the OSM "
    "features of a <b>preset</b> for the area (empty: the task's own preset, trees for trees, buildings for "
    "buildings, landcover for land cover; all fit land cover; editable files in the plugin's "
    "resources/presets/), from the <b>Overpass endpoint</b> (Advanced; default the public one), optionally as "
    "OSM was on a <b>date</b> (YYYY-MM-DD, ideally the imagery's); or <i>OpenStreetMap file</i> to read them "
    "from a local <b>OSM file</b> (.osm, .osm.pbf, .osm.bz2). The result layers then carry the attribution "
    "\"© OpenStreetMap contributors\" (ODbL) in their metadata.</p>",
    "<p><b>Output</b>: a GeoPackage with the result layers and their styles, loaded into the project. The "
    "job's pipeline file goes beside it (<i>NAME-pipeline.yaml</i>: <code>landcover run</code> reruns it), "
    "intermediate files to a folder beside it (<i>NAME-work</i>); running again reuses finished stages.</p>",
    "<p><b>Map for a report</b> (optional): a PDF of the results over the imagery with their legend, a scale "
    "bar, a north arrow, the title (task, area, model, date) and the credits of the labels and the imagery; a "
    "PNG of it is written beside the PDF.</p>",
    "<p><b>Train on a GPU host</b> (Advanced): a host added in the dock (Train on > Add host, then Test "
    "connection) or an ssh destination set up with <code>landcover remote setup HOST</code>: the training runs "
    "there, the model comes back, and the prediction runs here.</p>",
    "<p>With a <b>Dask scheduler</b> set in the Landcover dock, the prediction runs on that cluster's workers "
    "(they read the imagery and the model at the same paths); the log says how many took part.</p>",
    "<p>If the engine environment is missing, run <code>make install</code> in the plugin's source folder or "
    "use 'Create environment' in the Landcover dock.</p>",
))
# Parameters an analyst rarely changes: under "Advanced parameters" in the dialog.
ADVANCED = ("XYZ_URL", "GSD", "LABELS_FILE", "OVERPASS_URL", "DATE", "REMOTE_HOST")


def default_imagery(project: QgsProject) -> QgsRasterLayer | None:
    """The imagery to start with: the topmost raster file of the project. Web layers are never
    chosen for the user: they may be street maps (cartography, whose tile servers forbid bulk
    downloads), and fetching from a server is a choice to make knowingly. None off the main
    thread (a model creates its child algorithms there): the project's layers live in the main one."""
    app = QCoreApplication.instance()
    if app is None or QThread.currentThread() is not app.thread():
        return None
    for node in project.layerTreeRoot().findLayers():
        layer = node.layer()
        if isinstance(layer, QgsRasterLayer) and layer.providerType() == "gdal" and layer.isValid():
            return layer
    return None


def spec_hectares(spec: PipelineFile, context: QgsCoordinateTransformContext) -> float:
    """The size of the job's area (a bbox in its CRS), for the group name and the map's title."""
    rect = QgsGeometry.fromRect(QgsRectangle(*spec.aoi))
    return area_hectares(rect, QgsCoordinateReferenceSystem(spec.aoi_crs), context)


class MapFromImageryAlgorithm(QgsProcessingAlgorithm):
    IMAGERY, XYZ_URL, EXTENT, TASK = "IMAGERY", "XYZ_URL", "EXTENT", "TASK"
    LABELS, LABELS_FILE, CLASS_FIELD, MODEL = "LABELS", "LABELS_FILE", "CLASS_FIELD", "MODEL"
    EPOCHS, GSD, OUTPUT, LAYERS = "EPOCHS", "GSD", "OUTPUT", "LAYERS"
    REMOTE_HOST, MAP = "REMOTE_HOST", "MAP"
    LABEL_SOURCE, PRESET, OVERPASS_URL, OSM_FILE, DATE = "LABEL_SOURCE", "PRESET", "OVERPASS_URL", "OSM_FILE", "DATE"
    LABEL_SOURCES = tuple(job.LABEL_SOURCES)  # LABEL_SOURCE's values; 0 keeps older command lines working

    def __init__(self) -> None:
        super().__init__()
        self._gpkg: str | None = None
        self._results: dict = {}
        self._attribution = ""
        self._title = ""  # the result group's name and the map's title
        self._backdrop_source: tuple[str | None, str] = (None, "")  # the imagery under the map's results, its credit
        self._map = ""  # the map's PDF, when asked for

    def name(self) -> str:
        return "mapfromimagery"

    def displayName(self) -> str:  # noqa: N802 (QGIS's names)
        return "Map trees or land cover from imagery"

    def shortHelpString(self) -> str:  # noqa: N802
        return HELP

    def createInstance(self) -> "MapFromImageryAlgorithm":  # noqa: N802
        return MapFromImageryAlgorithm()

    def initAlgorithm(self, config=None) -> None:  # noqa: N802
        # Called again for each dialog and run (QgsProcessingAlgorithm.create): the imagery default
        # follows the project. With a raster file in it the imagery is required (and preselected);
        # without one it stays optional, for the XYZ URL under Advanced.
        imagery = default_imagery(QgsProject.instance())
        self.addParameter(QgsProcessingParameterRasterLayer(
            self.IMAGERY, "Imagery (raster layer)", defaultValue=imagery.id() if imagery else None,
            optional=imagery is None))
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, "Area"))
        self.addParameter(QgsProcessingParameterEnum(
            self.TASK, "Task", options=[t.label for t in TASKS], defaultValue=0))
        self.addParameter(QgsProcessingParameterEnum(
            self.LABEL_SOURCE, "Training labels from", defaultValue=0, options=list(job.LABEL_SOURCES.values())))
        self.addParameter(QgsProcessingParameterVectorLayer(self.LABELS, "Training labels layer",
                                                            [QgsProcessing.SourceType.TypeVectorAnyGeometry],
                                                            optional=True))
        self.addParameter(QgsProcessingParameterField(self.CLASS_FIELD, "Class field (land cover)",
                                                      parentLayerParameterName=self.LABELS, optional=True))
        presets = [p.name for p in read_presets()]
        self.addParameter(QgsProcessingParameterEnum(self.PRESET, "OSM preset (empty: the task's own)",
                                                     options=presets, optional=True, usesStaticStrings=True))
        self.addParameter(QgsProcessingParameterFile(self.OSM_FILE, "OSM file", optional=True,
                                                     fileFilter="OpenStreetMap files (*.osm *.pbf *.bz2)"))
        self.addParameter(QgsProcessingParameterFile(self.MODEL, "Model to predict with (.onnx)",
                                                     optional=True, fileFilter="ONNX models (*.onnx)"))
        self.addParameter(QgsProcessingParameterNumber(self.EPOCHS, "Training epochs",
                                                       QgsProcessingParameterNumber.Type.Integer, job.QUICK_EPOCHS,
                                                       minValue=1))
        self.addParameter(QgsProcessingParameterFileDestination(self.OUTPUT, "Result GeoPackage",
                                                                "GeoPackage (*.gpkg)"))
        self.addParameter(QgsProcessingParameterFileDestination(
            self.MAP, "Map for a report (PDF; a PNG beside it)", "PDF files (*.pdf)", optional=True,
            createByDefault=False))
        # Advanced:
        self.addParameter(QgsProcessingParameterString(self.XYZ_URL, "Imagery from an XYZ tile URL template "
                                                       "or a saved XYZ connection's name (instead of the layer)",
                                                       optional=True))
        self.addParameter(QgsProcessingParameterNumber(self.GSD, "Resolution of XYZ tiles (m/px)",
                                                       QgsProcessingParameterNumber.Type.Double, None, optional=True,
                                                       minValue=0.0))
        self.addParameter(QgsProcessingParameterFile(self.LABELS_FILE, "Training labels file (DeepForest CSV, "
                                                     "instead of the layer)", optional=True,
                                                     fileFilter="CSV files (*.csv);;All files (*)"))
        self.addParameter(QgsProcessingParameterString(self.OVERPASS_URL, "Overpass endpoint",
                                                       defaultValue=OVERPASS_DEFAULT, optional=True))
        self.addParameter(QgsProcessingParameterString(self.DATE, "OSM date (YYYY-MM-DD, Overpass only)",
                                                       optional=True))
        self.addParameter(QgsProcessingParameterString(self.REMOTE_HOST, "Train on a GPU host (a host added in "
                                                       "the dock, or an ssh destination; empty: this computer)",
                                                       optional=True))
        for name in ADVANCED:
            param = self.parameterDefinition(name)
            param.setFlags(param.flags() | QgsProcessingParameterDefinition.Flag.FlagAdvanced)
        self.addOutput(QgsProcessingOutputMultipleLayers(self.LAYERS, "Result layers"))

    def checkParameterValues(self, parameters, context):  # noqa: N802
        imagery = self.parameterDefinition(self.IMAGERY).defaultValue()
        if imagery and not parameters.get(self.IMAGERY):  # QGIS 3.22 checks a missing value, not its default
            parameters = {**parameters, self.IMAGERY: imagery}
        ok, message = super().checkParameterValues(parameters, context)
        if not ok:
            return ok, message
        has_imagery = bool(parameters.get(self.IMAGERY)) or bool((parameters.get(self.XYZ_URL) or "").strip())
        if not has_imagery:
            return False, "Choose the imagery: a raster layer or an XYZ tile URL template."
        source = self.LABEL_SOURCES[self.parameterAsEnum(parameters, self.LABEL_SOURCE, context)]
        if source == "osm_file" and not parameters.get(self.OSM_FILE):
            return False, "Give the OSM file (.osm, .osm.pbf, .osm.bz2) to take the labels from."
        if source in ("overpass", "osm_file"):
            task = TASK_IDS[self.parameterAsEnum(parameters, self.TASK, context)]
            preset = self.parameterAsEnumString(parameters, self.PRESET, context)
            fit = [p.name for p in presets_for_task(task)]
            if preset and preset not in fit:
                return False, f"Preset {preset} does not fit the {task} task: use {' or '.join(fit)}."
        elif source == "model" and not parameters.get(self.MODEL):
            return False, "Give the model (.onnx) to predict with."
        elif not (parameters.get(self.LABELS) or parameters.get(self.LABELS_FILE) or parameters.get(self.MODEL)):
            return False, "Give training labels (a layer or a DeepForest CSV), or an existing model to predict with."
        return True, ""

    def _imagery(self, parameters, context) -> tuple[ImagerySource, QgsCoordinateReferenceSystem]:
        """The XYZ URL when one is given (it is typed on purpose; the layer may be the default), else the layer."""
        url = self.parameterAsString(parameters, self.XYZ_URL, context).strip()
        layer = self.parameterAsRasterLayer(parameters, self.IMAGERY, context)
        if layer is not None and not url:
            return raster_layer_source(layer), layer.crs()
        saved = xyz_connections()  # a saved connection, by name or URL: with its referer and credentials
        source = saved.get(url) or next((s for s in saved.values() if s.source == url), ImagerySource(url))
        return source, QgsCoordinateReferenceSystem("EPSG:4326")

    def _aoi(self, parameters, context, default_crs) -> tuple[job.Bbox, str]:
        crs = self.parameterAsExtentCrs(parameters, self.EXTENT, context)
        return job.aoi_for_engine(self.parameterAsExtent(parameters, self.EXTENT, context),
                                  crs if crs.isValid() else default_crs, context.transformContext())

    def build_spec(self, parameters, context) -> PipelineFile:
        return self._spec_and_env(parameters, context)[0]

    def _spec_and_env(self, parameters, context) -> tuple[PipelineFile, dict[str, str]]:
        """The pipeline, and the engine's extra environment: credentials from QGIS's
        authentication database go there, never into the pipeline file, argv or a log."""
        try:
            imagery, imagery_crs = self._imagery(parameters, context)
            out = Path(self.parameterAsFileOutput(parameters, self.OUTPUT, context))
            if out.suffix.lower() != ".gpkg":
                out = out.with_suffix(".gpkg")
            labels_layer = self.parameterAsVectorLayer(parameters, self.LABELS, context)
            # Exactly the chosen layer: its own layer of a GeoPackage, its filter, its selected features.
            labels = labels_for_engine(labels_layer, out.with_name(out.stem + "-work")) if labels_layer else None
        except SourceError as exc:
            raise QgsProcessingException(str(exc)) from None
        labels_file = self.parameterAsFile(parameters, self.LABELS_FILE, context)
        model = self.parameterAsFile(parameters, self.MODEL, context)
        has_gsd = parameters.get(self.GSD) not in (None, "")
        gsd = self.parameterAsDouble(parameters, self.GSD, context) if has_gsd else None
        aoi, aoi_crs = self._aoi(parameters, context, imagery_crs)
        labels = labels or (Path(labels_file) if labels_file else None)
        osm = self._osm_labels(parameters, context)
        if osm:  # OSM is the chosen source: the layer, file and model parameters are not used
            labels, model = None, ""
        elif self.LABEL_SOURCES[self.parameterAsEnum(parameters, self.LABEL_SOURCE, context)] == "model":
            labels = None
        return PipelineFile(
            task=TASK_IDS[self.parameterAsEnum(parameters, self.TASK, context)], aoi=aoi, aoi_crs=aoi_crs,
            imagery=imagery.source, headers=imagery.headers, gsd=gsd if imagery.is_xyz else None,
            max_zoom=imagery.max_zoom,
            labels=labels, class_field=self.parameterAsString(parameters, self.CLASS_FIELD, context) or None,
            model=Path(model) if model and labels is None else None,
            epochs=self.parameterAsInt(parameters, self.EPOCHS, context), scheduler=job.scheduler_setting(),
            **self._remote(parameters, context),
            out=out, workdir=out.with_name(out.stem + "-work"), **osm), imagery.engine_env()

    def _remote(self, parameters, context) -> dict:
        """The pipeline's remote training fields: a host saved in the dock by name, or a destination."""
        name = self.parameterAsString(parameters, self.REMOTE_HOST, context).strip()
        if not name:
            return {}
        host = next((h for h in load_hosts(QgsSettings()) if h.name == name), RemoteHost(name, name))
        return {"remote": host.destination, "ssh_identity": host.identity_path}

    def _osm_labels(self, parameters, context) -> dict:
        """The pipeline file's OSM fields for the chosen label source ({} for a layer, file or model)."""
        source = self.LABEL_SOURCES[self.parameterAsEnum(parameters, self.LABEL_SOURCE, context)]
        if source not in ("overpass", "osm_file"):
            return {}
        task = TASK_IDS[self.parameterAsEnum(parameters, self.TASK, context)]
        preset = self.parameterAsEnumString(parameters, self.PRESET, context) or presets_for_task(task)[0].name
        if source == "osm_file":
            return {"preset": preset, "osm_file": Path(self.parameterAsFile(parameters, self.OSM_FILE, context))}
        return {"preset": preset,
                "overpass": self.parameterAsString(parameters, self.OVERPASS_URL, context).strip() or OVERPASS_DEFAULT,
                "date": self.parameterAsString(parameters, self.DATE, context).strip() or None}

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        spec, secrets = self._spec_and_env(parameters, context)
        problems = job.problems(spec)
        if problems:
            raise QgsProcessingException(" ".join(problems))
        location = engine_location()
        missing = check_engine(location)
        if missing:
            raise QgsProcessingException(missing)
        run = job.engine_run(spec, location, secrets)
        feedback.pushInfo(f"Pipeline: {job.pipeline_path(spec)}")
        relay = job.EventRelay(feedback.setProgress,
                               lambda message, level: (feedback.pushDebugInfo if level == "debug"
                                                       else feedback.pushInfo)(message),
                               lambda stage: feedback.setProgressText(f"Landcover: {stage}"))
        try:
            result = run.run(relay, feedback.isCanceled)
        except EngineFailed as exc:
            if exc.code == "CANCELLED":
                feedback.reportError(str(exc))
                return {}
            raise QgsProcessingException(f"{exc.message} {exc.hint}".strip()) from None
        outputs, summary = result["outputs"], result.get("summary", {})
        self._gpkg = outputs.get("gpkg") or str(spec.out)
        self._attribution = summary.get("attribution", "")  # labels from OSM
        feedback.pushInfo(f"Done: {summary_text(summary) or 'no summary'}{job.workers_note(summary)}.")
        if (summary.get("predict") or {}).get("hectares"):
            feedback.pushInfo(f"Hectares per class: {class_hectares_text(summary['predict']['hectares'])}.")
        feedback.pushDebugInfo(f"Engine summary: {json.dumps(summary, default=str)}")  # every figure, for the log
        self._title = group_name(task_info(spec.task).label, spec_hectares(spec, context.transformContext()),
                                 model_label(outputs.get("model") or spec.model), datetime.now())
        self._backdrop_source = (outputs.get("imagery"), self._imagery_name(parameters, context))
        self._map = self._map_path(parameters, context)
        self._results = {self.OUTPUT: self._gpkg,
                         self.LAYERS: [f"{self._gpkg}|layername={n}" for n in gpkg_layer_names(self._gpkg)]}
        return self._results

    def _imagery_name(self, parameters, context) -> str:
        """How the map credits the imagery: the layer's attribution or name, or the tile server's host."""
        url = self.parameterAsString(parameters, self.XYZ_URL, context).strip()
        layer = self.parameterAsRasterLayer(parameters, self.IMAGERY, context)
        if layer is not None and not url:
            return layer_credit(layer)
        return urlsplit(xyz_connections().get(url, ImagerySource(url)).source).hostname or url

    def _map_path(self, parameters, context) -> str:
        path = self.parameterAsFileOutput(parameters, self.MAP, context) if parameters.get(self.MAP) else ""
        return str(Path(path).with_suffix(".pdf")) if path else ""

    def postProcessAlgorithm(self, context, feedback):  # noqa: N802  (main thread)
        if not self._gpkg:
            return {}
        layers = open_result_layers(self._gpkg, self._attribution)
        for layer in layers:
            context.temporaryLayerStore().addMapLayer(layer)
            details = QgsProcessingContext.LayerDetails(layer.name(), context.project(), self.OUTPUT)
            if hasattr(details, "groupName"):  # QGIS >= 3.32 loads them in a group
                details.groupName = self._title
            context.addLayerToLoadOnCompletion(layer.id(), details)
        if self._map:
            self._export_map(layers, context, feedback)
        return self._results

    def _export_map(self, layers, context, feedback) -> None:
        """The map for a report; the results are whole already, so a failed export is reported, not fatal."""
        path, name = self._backdrop_source
        backdrop = QgsRasterLayer(path, name) if path else None
        try:
            layout = build_layout(context.project() or QgsProject.instance(), layers, self._title,
                                  [backdrop] if backdrop is not None and backdrop.isValid() else [])
            files = export_map(layout, Path(self._map), Path(self._map).with_suffix(".png"))
        except (OSError, ValueError) as exc:
            feedback.reportError(f"The map was not exported: {exc}")
            return
        feedback.pushInfo(f"Map: {files.pdf} and {files.png}")
        self._results[self.MAP] = str(files.pdf)
