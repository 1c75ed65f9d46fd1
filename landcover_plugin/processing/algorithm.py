"""landcover:mapfromimagery — the whole pipeline as a Processing algorithm.

The same engine run as the dock's, synchronous: Processing already runs the
algorithm in a background task (toolbox), in the modeler, in batch mode and
in `qgis_process.bin run landcover:mapfromimagery -- ...`.
"""
from __future__ import annotations

from pathlib import Path

from qgis.core import (QgsCoordinateReferenceSystem, QgsProcessing, QgsProcessingAlgorithm, QgsProcessingContext,
                       QgsProcessingException, QgsProcessingOutputMultipleLayers, QgsProcessingParameterDefinition,
                       QgsProcessingParameterEnum, QgsProcessingParameterExtent, QgsProcessingParameterField,
                       QgsProcessingParameterFile, QgsProcessingParameterFileDestination,
                       QgsProcessingParameterNumber, QgsProcessingParameterRasterLayer,
                       QgsProcessingParameterString, QgsProcessingParameterVectorLayer, QgsSettings)

from ..contract.names import OVERPASS_DEFAULT
from ..contract.pipeline_file import PipelineFile
from ..contract.runner import EngineFailed
from ..contract.tasks import TASK_IDS, TASKS, presets_for_task, read_presets
from ..core import job
from ..core.engine_env import check_engine
from ..core.layers import gpkg_layer_names, open_result_layers
from ..core.locate import engine_location
from ..core.remote_hosts import RemoteHost, load_hosts
from ..core.sources import ImagerySource, SourceError, raster_layer_source, vector_layer_path, xyz_connections

HELP = """<p>Maps trees (one polygon per crown, one point per tree), land cover (polygons with a
<i>class</i> field and a table of hectares per class), buildings (footprints) or land cover per
chip (one class per square chip, for very large areas) from imagery, in the Landcover engine's own
environment (never in QGIS's Python).</p>
<p><b>Imagery</b>: a raster layer (a local file, an XYZ or WMS layer), or an <b>XYZ tile URL</b> template such
as <code>https://tiles.example.org/{z}/{x}/{y}.png</code> or the name of a saved XYZ connection, fetched for
the area at the <b>resolution</b> given (m/px; empty: the engine picks). Credentials of a layer's or a saved
connection's authentication configuration reach the engine through its environment only.</p>
<p><b>Area</b>: the extent to map (and to train on). Without a CRS it is taken to be in the imagery
layer's CRS, or WGS84 for XYZ tiles.</p>
<p><b>Training labels</b>: a vector layer (crowns for trees; polygons with a <b>class field</b> for
land cover, per chip too; building polygons for buildings) or a DeepForest CSV of crown boxes (<b>labels file</b>). A model is trained on them for
<b>epochs</b> passes. Or give an existing <b>model</b> (.onnx) to predict without training.</p>
<p><b>Train on a GPU host</b> (advanced): a host added in the dock (Train on > Add host, then Test
connection) or an ssh destination set up with <code>landcover remote setup HOST</code>: the training runs
there, the model comes back, and the prediction runs here.</p>
<p><b>Labels from</b> OpenStreetMap instead: choose <i>OpenStreetMap (Overpass)</i> to query the OSM
features of a <b>preset</b> (landcover, buildings, trees: editable files in the plugin's
resources/presets/; trees fits the trees task, buildings the buildings task, all fit land cover) for the area from the
<b>Overpass endpoint</b> (default the public one), optionally as OSM was on a <b>date</b>
(YYYY-MM-DD, ideally the imagery's); or <i>OpenStreetMap file</i> to read them from a local
<b>OSM file</b> (.osm, .osm.pbf, .osm.bz2). The result layers then carry the attribution
"© OpenStreetMap contributors" (ODbL) in their metadata.</p>
<p><b>Output</b>: a GeoPackage with the result layers and their styles, loaded into the project.
The job's pipeline file goes beside it (<i>NAME-pipeline.yaml</i>: <code>landcover run</code> reruns it),
intermediate files to a folder beside it (<i>NAME-work</i>); running again reuses finished stages.</p>
<p>With a <b>Dask scheduler</b> set in the Landcover dock, the prediction runs on that cluster's workers
(they read the imagery and the model at the same paths); the log says how many took part.</p>
<p>If the engine environment is missing, run <code>make install</code> in the plugin's source folder
or use 'Create environment' in the Landcover dock.</p>"""


class MapFromImageryAlgorithm(QgsProcessingAlgorithm):
    IMAGERY, XYZ_URL, EXTENT, TASK = "IMAGERY", "XYZ_URL", "EXTENT", "TASK"
    LABELS, LABELS_FILE, CLASS_FIELD, MODEL = "LABELS", "LABELS_FILE", "CLASS_FIELD", "MODEL"
    EPOCHS, GSD, OUTPUT, LAYERS = "EPOCHS", "GSD", "OUTPUT", "LAYERS"
    REMOTE_HOST = "REMOTE_HOST"
    LABEL_SOURCE, PRESET, OVERPASS_URL, OSM_FILE, DATE = "LABEL_SOURCE", "PRESET", "OVERPASS_URL", "OSM_FILE", "DATE"
    LABEL_SOURCES = tuple(job.LABEL_SOURCES)  # LABEL_SOURCE's values; 0 keeps older command lines working

    def __init__(self) -> None:
        super().__init__()
        self._gpkg: str | None = None
        self._results: dict = {}
        self._attribution = ""

    def name(self) -> str:
        return "mapfromimagery"

    def displayName(self) -> str:  # noqa: N802 (QGIS's names)
        return "Map trees or land cover from imagery"

    def shortHelpString(self) -> str:  # noqa: N802
        return HELP

    def createInstance(self) -> "MapFromImageryAlgorithm":  # noqa: N802
        return MapFromImageryAlgorithm()

    def initAlgorithm(self, config=None) -> None:  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer(self.IMAGERY, "Imagery (raster layer)", optional=True))
        self.addParameter(QgsProcessingParameterString(self.XYZ_URL, "Or imagery from an XYZ tile URL template "
                                                       "(or a saved XYZ connection's name)", optional=True))
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, "Area"))
        self.addParameter(QgsProcessingParameterEnum(
            self.TASK, "Task", options=[t.label for t in TASKS], defaultValue=0))
        self.addParameter(QgsProcessingParameterVectorLayer(self.LABELS, "Training labels",
                                                            [QgsProcessing.SourceType.TypeVectorAnyGeometry], optional=True))
        self.addParameter(QgsProcessingParameterFile(self.LABELS_FILE, "Or training labels file (DeepForest CSV)",
                                                     optional=True, fileFilter="CSV files (*.csv);;All files (*)"))
        self.addParameter(QgsProcessingParameterField(self.CLASS_FIELD, "Class field (land cover)",
                                                      parentLayerParameterName=self.LABELS, optional=True))
        self.addParameter(QgsProcessingParameterFile(self.MODEL, "Or an existing model (predict only)",
                                                     optional=True, fileFilter="ONNX models (*.onnx)"))
        self.addParameter(QgsProcessingParameterEnum(
            self.LABEL_SOURCE, "Labels from", defaultValue=0, options=list(job.LABEL_SOURCES.values())))
        presets = [p.name for p in read_presets()]
        self.addParameter(QgsProcessingParameterEnum(self.PRESET, "OSM preset", options=presets,
                                                     defaultValue="landcover", usesStaticStrings=True))
        self.addParameter(QgsProcessingParameterString(self.OVERPASS_URL, "Overpass endpoint",
                                                       defaultValue=OVERPASS_DEFAULT, optional=True))
        self.addParameter(QgsProcessingParameterFile(self.OSM_FILE, "OSM file", optional=True,
                                                     fileFilter="OpenStreetMap files (*.osm *.pbf *.bz2)"))
        self.addParameter(QgsProcessingParameterString(self.DATE, "OSM date (YYYY-MM-DD, Overpass only)",
                                                       optional=True))
        self.addParameter(QgsProcessingParameterNumber(self.EPOCHS, "Training epochs",
                                                       QgsProcessingParameterNumber.Type.Integer, job.QUICK_EPOCHS,
                                                       minValue=1))
        remote = QgsProcessingParameterString(self.REMOTE_HOST, "Train on a GPU host (a host added in the dock, "
                                              "or an ssh destination; empty: this computer)", optional=True)
        remote.setFlags(remote.flags() | QgsProcessingParameterDefinition.Flag.FlagAdvanced)
        self.addParameter(remote)
        self.addParameter(QgsProcessingParameterNumber(self.GSD, "Resolution of XYZ tiles (m/px)",
                                                       QgsProcessingParameterNumber.Type.Double, None, optional=True,
                                                       minValue=0.0))
        self.addParameter(QgsProcessingParameterFileDestination(self.OUTPUT, "Result GeoPackage",
                                                                "GeoPackage (*.gpkg)"))
        self.addOutput(QgsProcessingOutputMultipleLayers(self.LAYERS, "Result layers"))

    def checkParameterValues(self, parameters, context):  # noqa: N802
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
            if preset not in fit:
                return False, f"Preset {preset} does not fit the {task} task: use {' or '.join(fit)}."
        elif source == "model" and not parameters.get(self.MODEL):
            return False, "Give the model (.onnx) to predict with."
        elif not (parameters.get(self.LABELS) or parameters.get(self.LABELS_FILE) or parameters.get(self.MODEL)):
            return False, "Give training labels (a layer or a DeepForest CSV), or an existing model to predict with."
        return True, ""

    def _imagery(self, parameters, context) -> tuple[ImagerySource, QgsCoordinateReferenceSystem]:
        layer = self.parameterAsRasterLayer(parameters, self.IMAGERY, context)
        if layer is not None:
            return raster_layer_source(layer), layer.crs()
        url = self.parameterAsString(parameters, self.XYZ_URL, context).strip()
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
            labels_layer = self.parameterAsVectorLayer(parameters, self.LABELS, context)
            labels = vector_layer_path(labels_layer) if labels_layer is not None else None
        except SourceError as exc:
            raise QgsProcessingException(str(exc)) from None
        labels_file = self.parameterAsFile(parameters, self.LABELS_FILE, context)
        model = self.parameterAsFile(parameters, self.MODEL, context)
        has_gsd = parameters.get(self.GSD) not in (None, "")
        gsd = self.parameterAsDouble(parameters, self.GSD, context) if has_gsd else None
        aoi, aoi_crs = self._aoi(parameters, context, imagery_crs)
        out = Path(self.parameterAsFileOutput(parameters, self.OUTPUT, context))
        if out.suffix.lower() != ".gpkg":
            out = out.with_suffix(".gpkg")
        labels = labels or (Path(labels_file) if labels_file else None)
        osm = self._osm_labels(parameters, context)
        if osm:  # OSM is the chosen source: the layer, file and model parameters are not used
            labels, model = None, ""
        elif self.LABEL_SOURCES[self.parameterAsEnum(parameters, self.LABEL_SOURCE, context)] == "model":
            labels = None
        return PipelineFile(
            task=TASK_IDS[self.parameterAsEnum(parameters, self.TASK, context)], aoi=aoi, aoi_crs=aoi_crs,
            imagery=imagery.source, headers=imagery.headers, gsd=gsd if imagery.is_xyz else None,
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
        preset = self.parameterAsEnumString(parameters, self.PRESET, context)
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
        self._gpkg = result["outputs"].get("gpkg") or str(spec.out)
        self._attribution = result.get("summary", {}).get("attribution", "")  # labels from OSM
        for key, value in result.get("summary", {}).items():
            feedback.pushInfo(f"{key}: {value}")
        if job.workers_note(result.get("summary", {})):
            feedback.pushInfo(f"Done{job.workers_note(result.get('summary', {}))}.")
        self._results = {self.OUTPUT: self._gpkg,
                         self.LAYERS: [f"{self._gpkg}|layername={n}" for n in gpkg_layer_names(self._gpkg)]}
        return self._results

    def postProcessAlgorithm(self, context, feedback):  # noqa: N802  (main thread)
        if not self._gpkg:
            return {}
        for layer in open_result_layers(self._gpkg, self._attribution):
            context.temporaryLayerStore().addMapLayer(layer)
            context.addLayerToLoadOnCompletion(
                layer.id(), QgsProcessingContext.LayerDetails(layer.name(), context.project(), self.OUTPUT))
        return self._results
