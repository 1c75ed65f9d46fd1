"""The Landcover dock: area, imagery, task, labels or model, Run/Cancel.

It only gathers the user's choices into a pipeline file and starts an
EngineTask; the work happens in the engine's own process.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from qgis.core import (QgsApplication, QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsFeatureRequest,
                       QgsGeometry, QgsMapLayerProxyModel, QgsProject, QgsRectangle, QgsSettings, QgsVectorLayer,
                       QgsWkbTypes)
from qgis.gui import (QgsCollapsibleGroupBox, QgsDockWidget, QgsDoubleSpinBox, QgsFieldComboBox, QgsFileWidget,
                      QgsMapLayerComboBox, QgsMapToolExtent, QgsRubberBand)
from qgis.PyQt.QtCore import QStandardPaths, Qt, QUrl
from qgis.PyQt.QtGui import QColor, QDesktopServices
from qgis.PyQt.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit,
                                 QMenu, QMessageBox, QProgressBar, QPushButton, QSpinBox, QToolButton, QVBoxLayout,
                                 QWidget)

from ..contract.model_file import ModelSummary, NotAModel, read_summary
from ..contract.names import OSM_ATTRIBUTION, OVERPASS_DEFAULT
from ..contract.pipeline_file import PipelineFile
from ..contract.runner import EngineFailed
from ..contract.tasks import TASKS, presets_for_task
from ..contract.tasks import task as task_info
from ..core import job
from ..core.engine_env import EngineLocation, check_engine, find_resource, plan_env, requirement_files, user_venv
from ..core.layers import class_hectares_text, group_name, load_result_layers, model_label
from ..core.print_layout import MapFiles, build_layout, export_map
from ..core.locate import choose_engine_python, engine_location, user_data_dir
from ..core.models import MODELS_FOLDER, describe, keep_model, list_models, model_problems, next_version
from ..core.remote_hosts import RemoteHost, fingerprint_in, load_hosts, save_hosts, setup_run, with_host
from ..core.setup_task import CreateEnvTask
from ..core.sources import (ImagerySource, SourceError, imagery_rank, labels_for_engine, raster_layer_source,
                            xyz_connections)
from ..core.task import EngineTask, training_text
from .area import (Area, PolygonTool, area_text, layer_extent_area, rectangle_area, selected_areas,
                   union_area)
from .host_dialog import HostDialog

XYZ_PREFIX = "XYZ: "
OVERPASS_SETTING = "landcover/overpass_url"
STATE_GROUP = "landcover/dock"  # the dock's choices, per profile (QgsSettings) and per project (its entries)
BROWSE = "browse"  # the model list's last item
HELP_ANCHOR = "#use-in-qgis"  # the README's section on the dock


@dataclass
class Results:
    """The last run's results: for 'Export map…' and 'Retrain with my corrections'."""

    gpkg: Path
    layers: list
    title: str
    spec: PipelineFile | None = None
    area: Area | None = None
    model: Path | None = None  # the model that mapped them
    crowns_at_load: list = field(default_factory=list)  # (hash, geometry) of each crown as the model drew it

    def crowns(self) -> QgsVectorLayer | None:
        return next((layer for layer in self.layers if layer.name() == "crowns"), None)


def crown_hashes(layer: QgsVectorLayer, area: QgsGeometry | None = None) -> list[tuple[str, QgsGeometry]]:
    """Each crown (inside `area`, in the layer's CRS, when given) as a hash of its outline and the outline."""
    request = QgsFeatureRequest(area.boundingBox()) if area is not None else QgsFeatureRequest()
    found = []
    for feature in layer.getFeatures(request):
        geometry = feature.geometry()
        if area is None or geometry.intersects(area):
            found.append((hashlib.sha1(bytes(geometry.asWkb())).hexdigest(), QgsGeometry(geometry)))
    return found


def default_output_dir() -> Path:
    """Next to the project; before it is saved, a Landcover folder in the user's documents."""
    home = QgsProject.instance().homePath()
    if home:
        return Path(home) / "landcover"
    documents = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.DocumentsLocation)
    return Path(documents or Path.home()) / "Landcover"


def models_dir() -> Path:
    """Where each trained model is kept in its own dated folder: beside the project, else the profile's."""
    home = QgsProject.instance().homePath()
    return (Path(home) / "landcover" if home else user_data_dir() / "landcover") / MODELS_FOLDER


class LandcoverDock(QgsDockWidget):
    def __init__(self, iface, parent: QWidget | None = None) -> None:
        super().__init__("Landcover", parent)
        self.setObjectName("LandcoverDock")
        self.iface = iface
        self.canvas = iface.mapCanvas()
        self.task: EngineTask | None = None
        self.env_task: CreateEnvTask | None = None
        self.connection_task: EngineTask | None = None
        self.area: Area | None = None
        self.batch: list[Area] = []  # selected features, one run each
        self.queue: list[tuple[PipelineFile, Area]] = []  # the batch's runs still to start
        self._xyz: dict[str, ImagerySource] = {}
        self._previous_tool = None
        self._reviewing = False  # the next drawn polygon is a reviewed area
        self.map_tool = QgsMapToolExtent(self.canvas)
        self.map_tool.extentChanged.connect(self.set_area)
        self.polygon_tool = PolygonTool(self.canvas)
        self.polygon_tool.polygon_drawn.connect(self._polygon_drawn)
        self.rubber_band = QgsRubberBand(self.canvas, QgsWkbTypes.GeometryType.PolygonGeometry)
        self.rubber_band.setColor(QColor(255, 140, 0, 200))
        self.rubber_band.setFillColor(QColor(255, 140, 0, 30))
        self.rubber_band.setWidth(2)
        self.canvas.destinationCrsChanged.connect(self._show_area)  # the band is drawn in map coordinates
        self._build()
        self.refresh_sources()
        self.refresh_models()
        self.restore_state()
        self.check_engine()

    # ---- widgets -------------------------------------------------------
    def _build(self) -> None:
        body = QWidget(self)
        outer = QVBoxLayout(body)
        intro_row = QHBoxLayout()
        intro = QLabel("Choose an area, the imagery and what to map, then press Run. Training and prediction "
                       "run in the Landcover engine, outside QGIS; results arrive as styled layers.")
        intro.setWordWrap(True)
        self.help_button = QToolButton(objectName="helpButton", text="?")
        self.help_button.setToolTip("Open the Landcover help: how to use this dock.")
        self.help_button.clicked.connect(self.open_help)
        intro_row.addWidget(intro, 1)
        intro_row.addWidget(self.help_button, 0, Qt.AlignmentFlag.AlignTop)
        outer.addLayout(intro_row)

        self.engine_label = QLabel(objectName="engineMessage", wordWrap=True)
        self.engine_label.setStyleSheet("color: #a40000")
        self.create_env_button = QPushButton("Create environment", objectName="createEnvButton")
        self.create_env_button.setToolTip("Create the engine's own Python environment in your QGIS profile and "
                                          "install its packages with pip (about 1 GB; QGIS's Python is not touched).")
        self.create_env_button.clicked.connect(self.create_environment)
        self.browse_engine_button = QPushButton("Browse to engine…", objectName="browseEngineButton")
        self.browse_engine_button.setToolTip("Use an engine environment you already have: choose its folder (it "
                                             "is checked to run this engine before it is kept).")
        self.browse_engine_button.clicked.connect(self.browse_to_engine)
        outer.addWidget(self.engine_label)
        engine_row = QHBoxLayout()
        engine_row.addWidget(self.create_env_button)
        engine_row.addWidget(self.browse_engine_button)
        outer.addLayout(engine_row)

        form = QFormLayout()
        outer.addLayout(form)

        self.draw_button = menu_button(
            "Draw rectangle", "drawButton", "The area to map (and to train on): drag a rectangle on the map, or "
            "use the arrow for a polygon, a layer's extent or the selected features.", self.start_drawing,
            (("Draw rectangle", self.start_drawing, "area_rectangle"),
             ("Draw polygon (right-click to close)", self.start_polygon, "area_polygon"),
             ("Extent of the current layer", self.use_layer_extent, "area_extent"),
             ("Selected features of the current layer", self.use_selected_features, "area_selected")))
        self.area_label = QLabel("No area yet", objectName="areaLabel", wordWrap=True)
        self.area_label.setToolTip("The area, its size and CRS.")
        self.per_feature_check = QCheckBox("One run per feature", objectName="perFeatureCheck")
        self.per_feature_check.setToolTip("Selected features: map each one on its own (a result group each), "
                                          "instead of all of them as one area.")
        self.per_feature_check.setVisible(False)
        area_row = QWidget(objectName="areaRow")
        area_box = QVBoxLayout(area_row)
        area_box.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        row.addWidget(self.draw_button)
        row.addWidget(self.area_label, 1)
        area_box.addLayout(row)
        area_box.addWidget(self.per_feature_check)
        self._rows: list[tuple[QFormLayout, QLabel, QWidget]] = []  # every row, in order, for _relayout
        self._hidden: set[QWidget] = set()
        self._add_row(form, "Area", area_row)

        self.imagery_combo = QgsMapLayerComboBox(objectName="imageryCombo")
        self.imagery_combo.setFilters(QgsMapLayerProxyModel.Filter.RasterLayer)
        self.imagery_combo.setAllowEmptyLayer(True)
        self.imagery_combo.setToolTip("Imagery to map: a raster layer of the project (a file) or an XYZ tile "
                                      "connection saved in QGIS (Browser > XYZ Tiles), fetched for the area; "
                                      "aerial and satellite sources first, street maps last (they are not imagery).")
        self.imagery_combo.currentIndexChanged.connect(self._imagery_changed)
        self._add_row(form, "Imagery", self.imagery_combo)

        self.gsd_spin = QgsDoubleSpinBox(objectName="gsdSpin")
        self.gsd_spin.setRange(0.0, 1000.0)
        self.gsd_spin.setDecimals(2)
        self.gsd_spin.setSuffix(" m/px")
        self.gsd_spin.setSpecialValueText("automatic")
        self.gsd_spin.setClearValue(0.0)
        self.gsd_spin.setToolTip("For XYZ tiles: the ground resolution to fetch (the nearest zoom level, at most "
                                 "the connection's maximum zoom). 'automatic': the model's resolution when "
                                 "predicting.")
        self._add_row(form, "Resolution", self.gsd_spin)

        self.task_combo = QComboBox(objectName="taskCombo")
        for t in TASKS:
            self.task_combo.addItem(t.label, t.id)
        self.task_combo.setToolTip(" ".join(f"{t.label}: {t.help}." for t in TASKS))
        self._add_row(form, "Task", self.task_combo)

        self.label_source_combo = QComboBox(objectName="labelSourceCombo")
        for key, label in job.LABEL_SOURCES.items():
            self.label_source_combo.addItem(label, key)
        self.set_label_source("overpass")  # a first map needs nothing but the area
        self.label_source_combo.setToolTip(
            "Where the training labels come from: OpenStreetMap features, downloaded for the area or read from "
            "a local OSM file; your own vector layer; or no labels, to map with a model you already have. "
            f"OSM data is {OSM_ATTRIBUTION}, ODbL: the results say so.")
        self._add_row(form, "Labels from", self.label_source_combo)

        self.preset_combo = QComboBox(objectName="presetCombo")
        self.preset_combo.setToolTip("Which OpenStreetMap features become which classes: an editable file in the "
                                     "plugin's resources/presets/ (tag filters, buffers for lines, priorities, "
                                     "colours). Only presets that fit the task are listed.")
        self._add_row(form, "OSM features", self.preset_combo)

        self.osm_file = QgsFileWidget(objectName="osmFile")
        self.osm_file.setFilter("OpenStreetMap files (*.osm *.pbf *.bz2)")
        self.osm_file.setToolTip("A local OpenStreetMap extract (.osm, .osm.pbf, .osm.bz2), e.g. from Geofabrik: "
                                 "no server needed; its features inside the area become the labels.")
        self._add_row(form, "OSM file", self.osm_file)

        self.labels_combo = QgsMapLayerComboBox(objectName="labelsCombo")
        self.labels_combo.setFilters(QgsMapLayerProxyModel.Filter.VectorLayer)
        self.labels_combo.setAllowEmptyLayer(True)
        self.labels_combo.setLayer(None)
        self.labels_combo.setToolTip("Training labels: crown polygons or boxes (trees), or polygons with a class "
                                     "attribute (land cover). Exactly this layer is used: its filter, and only "
                                     "its selected features when some are selected.")
        self.labels_file_button = QToolButton(objectName="labelsFileButton", text="…")
        self.labels_file_button.setToolTip("Add a vector file (GeoPackage, Shapefile, GeoJSON, CSV) to the project "
                                           "and use it as the labels.")
        self.labels_file_button.clicked.connect(self.browse_labels)
        self.labels_row = QWidget(objectName="labelsRow")
        row = QHBoxLayout(self.labels_row)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.labels_combo, 1)
        row.addWidget(self.labels_file_button)
        self._add_row(form, "Labels layer", self.labels_row)

        self.class_field_combo = QgsFieldComboBox(objectName="classFieldCombo")
        self.class_field_combo.setAllowEmptyFieldName(True)
        self.class_field_combo.setToolTip("Land cover: the labels' attribute holding the class name.")
        self.labels_combo.layerChanged.connect(self.class_field_combo.setLayer)
        self._add_row(form, "Class field", self.class_field_combo)

        self.model_combo = QComboBox(objectName="modelCombo")
        self.model_combo.setToolTip("The model to map with: the shipped ones and the models your earlier runs "
                                    "trained (task, resolution, bands, validation score), or Browse for a .onnx "
                                    "file. A model of another task or band count is refused with the reason.")
        self.model_combo.activated.connect(self._model_activated)
        self.model_combo.currentIndexChanged.connect(lambda *_: self._show_report_of(self.model()))
        self._add_row(form, "Model", self.model_combo)
        self.labels_combo.layerChanged.connect(lambda layer: layer is not None and self.set_label_source("layer"))
        self.label_source_combo.currentIndexChanged.connect(self._rows_changed)
        self.task_combo.currentIndexChanged.connect(self._task_changed)
        self._fill_presets()

        self.epochs_spin = QSpinBox(objectName="epochsSpin")
        self.epochs_spin.setRange(1, 1000)
        self.epochs_spin.setValue(job.QUICK_EPOCHS)
        self.epochs_spin.setToolTip("Training passes over the labelled chips: more is slower and usually better "
                                    "(training stops early when it no longer improves).")
        self._add_row(form, "Epochs", self.epochs_spin)

        self.out_dir = QgsFileWidget(objectName="outputDir")
        self.out_dir.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.out_dir.setFilePath(str(default_output_dir()))
        self.out_dir.setToolTip("Folder for the results (a GeoPackage per run), the job file and intermediate "
                                "files (a rerun reuses finished steps). Next to the project by default.")
        self._add_row(form, "Output folder", self.out_dir)

        self.advanced = QgsCollapsibleGroupBox("Advanced", objectName="advancedGroup")
        self.advanced.setCollapsed(True)
        # The rows sit in a body of their own: rows shown again by _relayout stay inside the collapsed box.
        advanced_body = QWidget(objectName="advancedBody")
        QVBoxLayout(self.advanced).addWidget(advanced_body)
        advanced = QFormLayout(advanced_body)
        advanced.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.advanced)

        self.overpass_edit = QLineEdit(objectName="overpassEdit")
        self.overpass_edit.setText(str(QgsSettings().value(OVERPASS_SETTING, OVERPASS_DEFAULT)))
        self.overpass_edit.setPlaceholderText(OVERPASS_DEFAULT)
        self.overpass_edit.setToolTip("The Overpass API address OpenStreetMap features are downloaded from (the "
                                      "public one by default; use your own or a mirror for large or frequent "
                                      "jobs). Remembered for next time.")
        self.overpass_edit.editingFinished.connect(self._remember_overpass)
        self._add_row(advanced, "Overpass server", self.overpass_edit)

        self.date_edit = QLineEdit(objectName="dateEdit")
        self.date_edit.setPlaceholderText("YYYY-MM-DD (optional: today's OSM)")
        self.date_edit.setToolTip("Optional: take OSM as it was on this day, ideally the imagery's date, so that "
                                  "labels show what the image shows. Empty: the current map.")
        self._add_row(advanced, "OSM date", self.date_edit)

        self.train_on_combo = QComboBox(objectName="trainOnCombo")
        self.train_on_combo.setToolTip("Where training runs: this computer, or a GPU host you reach with ssh "
                                       "(the dataset goes there, the model comes back; the training goes on "
                                       "there if the connection drops). Prediction runs here, or on the Dask "
                                       "scheduler's workers (below).")
        self.add_host_button = QPushButton("Add host…", objectName="addHostButton")
        self.add_host_button.setToolTip("Add a GPU host reached with ssh: a name, the ssh destination, a key file.")
        self.add_host_button.clicked.connect(self.ask_new_host)
        self.test_host_button = QPushButton("Test connection", objectName="testHostButton")
        self.test_host_button.setToolTip("Connect to the chosen host, install or update the Landcover engine "
                                         "there, and show its GPUs (the first time takes minutes).")
        self.test_host_button.clicked.connect(lambda: self.test_connection())
        self.train_on_row = QWidget()
        row = QHBoxLayout(self.train_on_row)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.train_on_combo, 1)
        row.addWidget(self.add_host_button)
        row.addWidget(self.test_host_button)
        self._add_row(advanced, "Train on", self.train_on_row)
        self.train_on_combo.currentIndexChanged.connect(
            lambda *_: self.test_host_button.setEnabled(self.remote_host() is not None))
        self._fill_hosts()

        self.scheduler_edit = QLineEdit(objectName="schedulerEdit")
        self.scheduler_edit.setText(job.scheduler_setting() or "")
        self.scheduler_edit.setPlaceholderText("optional: tcp://HOST:8786")
        self.scheduler_edit.setToolTip("Optional: a Dask scheduler (tcp://HOST:PORT, or tls:// with Dask's TLS "
                                       "configuration) whose workers predict, for areas one machine is too slow "
                                       "for; they must read the imagery and model at the same paths. Empty: "
                                       "this machine. Remembered, and used by Processing too.")
        self.scheduler_edit.editingFinished.connect(self._remember_scheduler)
        self._add_row(advanced, "Dask scheduler", self.scheduler_edit)

        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run", objectName="runButton")
        self.run_button.setToolTip("Fetch the imagery, train on the labels (or use the model), predict, "
                                   "and load the results as styled layers.")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel", objectName="cancelButton", enabled=False)
        self.cancel_button.setToolTip("Stop the engine; nothing half-written is kept, finished steps are reused.")
        self.cancel_button.clicked.connect(self.cancel)
        self.report_button = QPushButton("Open report", objectName="reportButton", enabled=False)
        self.report_button.setToolTip("The model's card: validation scores (per class and the confusion matrix "
                                      "for land cover), the training curves, what it was trained on.")
        self.report_button.clicked.connect(self.open_report)
        self.report_path: Path | None = None
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.report_button)
        self.export_button = QPushButton("Export map…", objectName="exportButton", enabled=False)
        self.export_button.setToolTip("The last results as a map for a report: a PDF and a PNG (legend, scale bar, "
                                      "north arrow, the labels' and imagery's credits) beside the result file.")
        self.export_button.clicked.connect(lambda: self.export_result_map())
        self.results: Results | None = None
        buttons.addWidget(self.export_button)
        outer.addLayout(buttons)

        self.retrain_button = menu_button(
            "Retrain with my corrections", "retrainButton",
            "Correct the crowns layer in an area you review (delete false crowns, draw missed ones, reshape), "
            "then press: that area becomes complete labels, the model is fine-tuned from the one that mapped "
            "them, the area is mapped again, and the new version (v2, v3, …) is kept with its scores. "
            "The reviewed area is the current map extent, or a polygon you draw (arrow).",
            self.retrain_with_corrections,
            (("Reviewed area: the current map extent", self.retrain_with_corrections, "reviewed_extent"),
             ("Reviewed area: a polygon I draw", self.draw_reviewed_area, "reviewed_polygon")))
        self.retrain_button.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.retrain_button)
        outer.addLayout(buttons)

        self.progress = QProgressBar(objectName="progressBar")
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        outer.addWidget(self.progress)
        self.status_label = QLabel("", objectName="statusLabel", wordWrap=True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        outer.addWidget(self.status_label)
        outer.addStretch(1)
        self.setWidget(body)
        self._rows_changed()

    def _add_row(self, form: QFormLayout, text: str, widget: QWidget) -> None:
        label = QLabel(text)
        form.addRow(label, widget)
        self._rows.append((form, label, widget))

    def _relayout(self) -> None:
        """Lay out only the rows that apply: a hidden row is taken out of its form, since
        Qt 5's QFormLayout keeps a hidden row's spacing (a gap per row)."""
        for form in {form for form, _, _ in self._rows}:
            while form.rowCount():
                form.takeRow(0)
        for form, label, widget in self._rows:
            shown = widget not in self._hidden
            if shown:
                form.addRow(label, widget)
            label.setVisible(shown)
            widget.setVisible(shown)

    def row_label(self, widget: QWidget) -> QLabel:
        return next(label for _, label, field in self._rows if field is widget)

    # ---- inputs --------------------------------------------------------
    def refresh_sources(self) -> None:
        """Re-read the XYZ connections saved in QGIS: aerial and satellite imagery first, street maps last.
        With no raster layer, an imagery connection is chosen, never a street map."""
        self._xyz = xyz_connections()
        names = sorted(self._xyz, key=lambda n: (imagery_rank(n, self._xyz[n]), n.lower()))
        self.imagery_combo.setAdditionalItems([XYZ_PREFIX + name + (" (street map)" if self._xyz[name].is_street_map
                                                                   else "") for name in names])
        if self.imagery_combo.currentLayer() is None and not self.imagery_combo.currentText():
            first = next((n for n in names if imagery_rank(n, self._xyz[n]) == 0), None)
            if first is not None:
                self.imagery_combo.setCurrentIndex(self.imagery_combo.findText(XYZ_PREFIX + first))

    def refresh_models(self, select: Path | None = None) -> None:
        """The model list: earlier runs' models (newest first) and the shipped ones, then Browse."""
        current = select or self.model_path()
        self.model_combo.clear()
        for model in list_models([models_dir()]):
            self.model_combo.addItem(describe(model), model)
            self.model_combo.setItemData(self.model_combo.count() - 1, str(model.folder), Qt.ItemDataRole.ToolTipRole)
        self.model_combo.addItem("Browse for a model file…", BROWSE)
        if current is not None:
            self.set_model(current)

    def model(self) -> ModelSummary | None:
        data = self.model_combo.currentData()
        return data if isinstance(data, ModelSummary) else None

    def model_path(self) -> Path | None:
        model = self.model()
        return model.path if model else None

    def set_model(self, path: Path | str) -> None:
        """Choose a model by its folder or .onnx file, adding it to the list when it is not there."""
        path = Path(path)
        onnx = path / "model.onnx" if path.is_dir() else path
        for i in range(self.model_combo.count()):
            data = self.model_combo.itemData(i)
            if isinstance(data, ModelSummary) and data.path.resolve() == onnx.resolve():
                self.model_combo.setCurrentIndex(i)
                return
        try:
            model = read_summary(onnx)
        except (NotAModel, OSError) as exc:
            self.status_label.setText(f"Not a model Landcover can use: {exc}")
            return
        self.model_combo.insertItem(0, describe(model), model)
        self.model_combo.setCurrentIndex(0)

    def _model_activated(self, index: int) -> None:
        if self.model_combo.itemData(index) == BROWSE:
            path, _ = QFileDialog.getOpenFileName(self, "Choose a model", str(models_dir()), "ONNX models (*.onnx)")
            self.model_combo.setCurrentIndex(0)
            if path:
                self.set_model(path)

    def browse_labels(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a labels file", str(default_output_dir()),
                                              "Vector files (*.gpkg *.shp *.geojson *.json *.csv *.kml *.fgb);;"
                                              "All files (*)")
        if path:
            self.add_labels_file(path)

    def add_labels_file(self, path: str) -> None:
        """Open a vector file as a layer of the project (each layer of a GeoPackage) and choose it."""
        layer = QgsVectorLayer(path, Path(path).stem, "ogr")
        if not layer.isValid():
            self.status_label.setText(f"QGIS cannot open {path} as a vector layer.")
            return
        QgsProject.instance().addMapLayer(layer)
        self.labels_combo.setLayer(layer)

    def _imagery_changed(self, *_args) -> None:
        self._rows_changed()

    def label_source(self) -> str:
        return self.label_source_combo.currentData()

    def set_label_source(self, key: str) -> None:
        self.label_source_combo.setCurrentIndex(self.label_source_combo.findData(key))

    def _task_changed(self, *_args) -> None:
        self._fill_presets()
        self._rows_changed()

    def _rows_changed(self, *_args) -> None:
        """Show only the rows that apply to the imagery, the task and the label source."""
        source, task = self.label_source(), self.task_key()
        training = source != "model"
        rows = {self.gsd_spin: self.imagery_combo.currentLayer() is None,  # tiles only
                self.preset_combo: source in ("overpass", "osm_file"), self.overpass_edit: source == "overpass",
                self.date_edit: source == "overpass", self.osm_file: source == "osm_file",
                self.labels_row: source == "layer",
                self.class_field_combo: source == "layer" and task in ("landcover", "classification"),
                self.model_combo: not training, self.epochs_spin: training, self.train_on_row: training}
        self._hidden = {widget for widget, shown in rows.items() if not shown}
        self._relayout()
        self.retrain_button.setVisible(task == "trees")  # corrections are crowns

    def _fill_presets(self, *_args) -> None:
        """The presets that fit the task; the task's namesake (first) is chosen."""
        self.preset_combo.clear()
        for preset in presets_for_task(self.task_key()):
            self.preset_combo.addItem(preset.name, preset.name)
            self.preset_combo.setItemData(self.preset_combo.count() - 1, preset.description,
                                          Qt.ItemDataRole.ToolTipRole)

    def _remember_overpass(self) -> None:
        QgsSettings().setValue(OVERPASS_SETTING, self.overpass_edit.text().strip() or OVERPASS_DEFAULT)

    def _remember_scheduler(self) -> None:
        QgsSettings().setValue(job.SCHEDULER_SETTING, self.scheduler_edit.text().strip())

    # ---- remembered choices --------------------------------------------
    def state(self) -> dict[str, str]:
        """The choices a user expects to find again: per profile and in the project."""
        return {"task": self.task_key(), "label_source": self.label_source(),
                "preset": str(self.preset_combo.currentData() or ""), "epochs": str(self.epochs_spin.value()),
                "gsd": str(self.gsd_spin.value()), "model": str(self.model_path() or ""),
                "out_dir": self.out_dir.filePath().strip()}

    def remember_state(self) -> None:
        settings, project = QgsSettings(), QgsProject.instance()
        for key, value in self.state().items():
            if key != "out_dir":  # a folder belongs to its project
                settings.setValue(f"{STATE_GROUP}/{key}", value)
            project.writeEntry("landcover", f"dock/{key}", value)

    def restore_state(self) -> None:
        """The project's choices, else the profile's last ones."""
        settings, project = QgsSettings(), QgsProject.instance()
        saved = {}
        for key in self.state():
            value, found = project.readEntry("landcover", f"dock/{key}", "")
            saved[key] = value if found and value else str(settings.value(f"{STATE_GROUP}/{key}", "") or "")
        if saved["task"] and self.task_combo.findData(saved["task"]) >= 0:
            self.task_combo.setCurrentIndex(self.task_combo.findData(saved["task"]))
        if saved["label_source"] and self.label_source_combo.findData(saved["label_source"]) >= 0:
            self.set_label_source(saved["label_source"])
        if saved["preset"] and self.preset_combo.findData(saved["preset"]) >= 0:
            self.preset_combo.setCurrentIndex(self.preset_combo.findData(saved["preset"]))
        if saved["epochs"].isdigit():
            self.epochs_spin.setValue(int(saved["epochs"]))
        try:
            self.gsd_spin.setValue(float(saved["gsd"] or 0))
        except ValueError:
            pass
        if saved["model"] and Path(saved["model"]).exists():
            self.set_model(saved["model"])
        if saved["out_dir"]:
            self.out_dir.setFilePath(saved["out_dir"])
        self._rows_changed()

    # ---- the area ------------------------------------------------------
    def _start_tool(self, tool, message: str) -> None:
        if self.canvas.mapTool() not in (self.map_tool, self.polygon_tool):
            self._previous_tool = self.canvas.mapTool()
        self.canvas.setMapTool(tool)
        self.status_label.setText(message)

    def _restore_tool(self) -> None:
        """One area, then back to the tool the user had."""
        if self.canvas.mapTool() in (self.map_tool, self.polygon_tool):
            if self._previous_tool is not None:
                self.canvas.setMapTool(self._previous_tool)
            else:
                self.canvas.unsetMapTool(self.canvas.mapTool())

    def start_drawing(self) -> None:
        self._start_tool(self.map_tool, "Drag a rectangle on the map.")

    def start_polygon(self) -> None:
        self._reviewing = False
        self._start_tool(self.polygon_tool, "Click the polygon's corners on the map; right-click to close it.")

    def set_area(self, extent: QgsRectangle, crs: QgsCoordinateReferenceSystem | None = None) -> None:
        """A rectangle (in the canvas CRS unless `crs` is given) as the area."""
        if not extent.isEmpty():
            self.set_areas([rectangle_area(QgsRectangle(extent), crs or self.canvas.mapSettings().destinationCrs())])

    def _polygon_drawn(self, geometry) -> None:
        area = Area(geometry, self.canvas.mapSettings().destinationCrs(), "", "polygon")
        if self._reviewing:  # the polygon is the reviewed area of a retraining, not the area to map
            self._reviewing = False
            self._restore_tool()
            self.retrain_with_corrections(area)
            return
        self.set_areas([area])

    def use_layer_extent(self, layer=None) -> None:
        layer = layer or self.iface.activeLayer()
        if layer is None:
            self.status_label.setText("Choose a layer in the Layers panel first: its extent becomes the area.")
            return
        self.set_areas([layer_extent_area(layer)])

    def use_selected_features(self, layer=None) -> None:
        layer = layer or self.iface.activeLayer()
        areas = selected_areas(layer) if isinstance(layer, QgsVectorLayer) else []
        if not areas:
            self.status_label.setText("Select one or more polygons of a layer (and make it the current layer): "
                                      "they become the area, or one run each.")
            return
        self.set_areas(areas)

    def set_areas(self, areas: list[Area]) -> None:
        """One area, or several (selected features): one run for all, or one run each when asked."""
        self.batch = areas if len(areas) > 1 else []
        self.area = union_area(areas) if len(areas) > 1 else areas[0]
        self.per_feature_check.setVisible(len(areas) > 1)
        self.per_feature_check.setText(f"One run per feature ({len(areas)} runs)")
        self._show_area()
        self.area_label.setText(area_text(self.area))
        self.status_label.setText("")
        self._restore_tool()

    def _show_area(self) -> None:
        if self.area is not None:
            self.rubber_band.setToGeometry(self.area.geometry, self.area.crs)

    def aoi(self, folder: Path | None = None, area: Area | None = None) -> tuple[job.Bbox | str, str]:
        """The area as the pipeline file takes it (a polygon's GeoPackage goes into `folder`)."""
        area = area or self.area
        if area is None:
            return (0.0, 0.0, 0.0, 0.0), "EPSG:4326"
        return area.for_engine(folder or Path(self.out_dir.filePath().strip() or default_output_dir()) / "areas")

    def imagery(self) -> ImagerySource | None:
        layer = self.imagery_combo.currentLayer()
        if layer is not None:
            return raster_layer_source(layer)
        text = self.imagery_combo.currentText().removesuffix(" (street map)")
        return self._xyz.get(text[len(XYZ_PREFIX):]) if text.startswith(XYZ_PREFIX) else None

    def task_key(self) -> str:
        return self.task_combo.currentData()

    def problems(self, spec: PipelineFile) -> list[str]:
        """The job's problems (job.problems) and the dock's own: a street map as imagery, a model
        that does not fit the task or the imagery's bands."""
        found = job.problems(spec)
        imagery = self.imagery()
        if imagery is not None and imagery.is_street_map:
            name = self.imagery_combo.currentText()[len(XYZ_PREFIX):].removesuffix(" (street map)")
            found.append(f"{name} is a street map, not imagery: "
                         "a model learns nothing from it and its tile server forbids bulk downloads. Choose "
                         "aerial or satellite imagery.")
        model = self.model() if self.label_source() == "model" else None
        if model is not None:
            layer = self.imagery_combo.currentLayer()
            found += model_problems(model, spec.task, layer.bandCount() if layer is not None else 3)
        return found

    def build_spec(self, out_dir: Path, area: Area | None = None, name: str = "") -> PipelineFile:
        """The pipeline for the current inputs (over `area`, the dock's by default); raises
        SourceError for a layer the engine cannot read. Check self.problems(spec) before running it."""
        imagery = self.imagery()
        source = self.label_source()
        labels_layer = self.labels_combo.currentLayer() if source == "layer" else None
        osm_file = self.osm_file.filePath().strip() if source == "osm_file" else ""
        overpass = (self.overpass_edit.text().strip() or OVERPASS_DEFAULT) if source == "overpass" else None
        task = self.task_key()
        aoi, aoi_crs = self.aoi(out_dir / "areas", area)
        stamp = time.strftime("%Y%m%d-%H%M%S") + (f"-{_safe(name)}" if name else "")
        host, training = self.remote_host(), source != "model"
        return PipelineFile(
            task=task, aoi=aoi, aoi_crs=aoi_crs,
            imagery=imagery.source if imagery else "",
            headers=imagery.headers if imagery else {},
            gsd=(self.gsd_spin.value() or None) if imagery and imagery.is_xyz else None,
            max_zoom=imagery.max_zoom if imagery else None,
            labels=labels_for_engine(labels_layer, out_dir / f"{task}-work") if labels_layer is not None else None,
            class_field=(self.class_field_combo.currentField() or None) if labels_layer is not None else None,
            model=self.model_path() if not training else None,
            preset=self.preset_combo.currentData() if source in ("overpass", "osm_file") else None,
            osm_file=Path(osm_file) if osm_file else None,
            overpass=overpass,
            date=(self.date_edit.text().strip() or None) if overpass else None,
            epochs=self.epochs_spin.value(),
            scheduler=self.scheduler_edit.text().strip() or None,
            remote=host.destination if host and training else None,
            ssh_identity=host.identity_path if host and training else None,
            out=out_dir / f"{task}-{stamp}.gpkg",
            workdir=out_dir / f"{task}-work",
        )

    # ---- GPU hosts -----------------------------------------------------
    def _fill_hosts(self, select: str | None = None) -> None:
        self.train_on_combo.clear()
        self.train_on_combo.addItem("this computer", None)
        for host in load_hosts(QgsSettings()):
            self.train_on_combo.addItem(host.name, host)
        if select:
            self.train_on_combo.setCurrentIndex(self.train_on_combo.findText(select))
        self.test_host_button.setEnabled(self.remote_host() is not None)

    def remote_host(self) -> RemoteHost | None:
        return self.train_on_combo.currentData()

    def add_host(self, host: RemoteHost) -> None:
        """Keep the host in the user's settings and choose it."""
        settings = QgsSettings()
        save_hosts(settings, with_host(load_hosts(settings), host))
        self._fill_hosts(select=host.name)

    def ask_new_host(self) -> None:
        dialog = HostDialog(self)
        if dialog.exec() and dialog.host() is not None:
            self.add_host(dialog.host())
            self.status_label.setText("Host added: press 'Test connection' to set it up.")

    def test_connection(self, accept_fingerprint: str | None = None) -> EngineTask | None:
        """`landcover remote setup` for the chosen host, in a task; shows the GPU it found."""
        host, location = self.remote_host(), self.check_engine()
        if host is None or location is None or self.connection_task is not None:
            return None
        task = EngineTask(f"Landcover: connect to {host.name}", setup_run(location, host, accept_fingerprint),
                          message_bar=self.iface.messageBar(),
                          on_success=lambda event: self._connected(host, event),
                          on_failure=lambda failure: self._not_connected(host, failure))
        self.connection_task = task
        self.test_host_button.setEnabled(False)
        self.status_label.setText(f"Connecting to {host.name} (installing the engine there the first time "
                                  "takes minutes)...")
        QgsApplication.taskManager().addTask(task)
        return task

    def _connected(self, host: RemoteHost, event: dict) -> None:
        self.connection_task = None
        self.test_host_button.setEnabled(True)
        summary = event.get("summary", {})
        self.status_label.setText(f"{host.name} is ready: Python {summary.get('python')}; {summary.get('found')}.")

    def _not_connected(self, host: RemoteHost, failure: EngineFailed) -> None:
        self.connection_task = None
        self.test_host_button.setEnabled(True)
        fingerprint = fingerprint_in(failure.message) if failure.code == "HOST_KEY_UNKNOWN" else None
        if fingerprint is None:
            self.status_label.setText(str(failure))
            return
        answer = QMessageBox.question(
            self, "Trust this host?",
            f"{host.name} ({host.destination}) is a host you have not connected to before. Its key fingerprint "
            f"is:\n\n{fingerprint}\n\nTrust it only if the host's administrator confirms this fingerprint.")
        if answer == QMessageBox.StandardButton.Yes:
            self.test_connection(accept_fingerprint=fingerprint)
        else:
            self.status_label.setText(f"{host.name} was not trusted: nothing was sent to it.")

    # ---- engine --------------------------------------------------------
    def check_engine(self) -> EngineLocation | None:
        """The engine's location, or None after showing what is missing and the offer."""
        location = engine_location()
        message = check_engine(location)
        self.engine_label.setText(message or "")
        self.engine_label.setVisible(bool(message))
        self.create_env_button.setVisible(bool(message))
        self.browse_engine_button.setVisible(bool(message))
        return None if message else location

    def browse_to_engine(self, chosen: Path | None = None) -> bool:
        """Keep an existing engine environment (its folder or python) when it runs this engine."""
        if chosen is None:
            folder = QFileDialog.getExistingDirectory(self, "Choose the engine environment's folder")
            if not folder:
                return False
            chosen = Path(folder)
        problem = choose_engine_python(Path(chosen))
        self.status_label.setText(problem or f"Using the engine environment at {chosen}.")
        return problem is None and self.check_engine() is not None

    def create_environment(self) -> None:
        requirements = requirement_files()
        if requirements is None:
            self.status_label.setText("Cannot find the plugin's requirements folder; "
                                      "run `make install` in the plugin's source folder instead.")
            return
        venv = user_venv(user_data_dir())
        answer = QMessageBox.question(self, "Create the engine environment",
                                      f"Create a Python environment at {venv} and install the engine's packages "
                                      "(TensorFlow, onnxruntime, rasterio, ...; about 1 GB download)?")
        if answer != QMessageBox.StandardButton.Yes:
            return
        self.env_task = CreateEnvTask(plan_env(venv, requirements), self._env_done)
        self.env_task.progressChanged.connect(lambda v: self.progress.setValue(int(v)))
        self.env_task.stageChanged.connect(self.status_label.setText)
        self.create_env_button.setEnabled(False)
        self.status_label.setText("Creating the engine environment (see the Landcover log panel)...")
        QgsApplication.taskManager().addTask(self.env_task)

    def _env_done(self, ok: bool, message: str) -> None:
        self.create_env_button.setEnabled(True)
        self.status_label.setText(message)
        self.check_engine()

    def run(self) -> EngineTask | None:
        """Validate, write the pipeline file(s) and start the engine; the (first) task or None.
        Selected features with 'one run per feature' queue one run each."""
        if self.task is not None:
            return None
        location = self.check_engine()
        if location is None:
            self.status_label.setText(self.engine_label.text())
            return None
        out_dir = Path(self.out_dir.filePath().strip() or default_output_dir())
        areas = self.batch if self.batch and self.per_feature_check.isChecked() else [self.area]
        try:
            jobs = [(self.build_spec(out_dir, area, area.name if len(areas) > 1 else ""), area) for area in areas]
        except (SourceError, OSError) as exc:
            self.status_label.setText(str(exc))
            return None
        problems = self.problems(jobs[0][0])
        if problems:
            self.status_label.setText("\n".join(problems))
            return None
        if jobs[0][0].overpass:
            self._remember_overpass()
        self.remember_state()
        self.queue = jobs
        return self._start_next(location)

    def _start_next(self, location: EngineLocation) -> EngineTask | None:
        spec, area = self.queue.pop(0)
        label = task_info(spec.task).label.lower()
        imagery = self.imagery()
        run = job.engine_run(spec, location, imagery.engine_env() if imagery else {})
        title = f"Landcover: {label}" + (f" ({area.name})" if area is not None and area.name and self.batch else "")
        task = EngineTask(title, run, message_bar=self.iface.messageBar(),
                          on_success=lambda event: self._succeeded(event, label, spec, area, location),
                          on_failure=self._failed)
        task.progressChanged.connect(lambda v: self.progress.setValue(int(v)))
        task.stage_changed.connect(self.status_label.setText)
        self.task = task
        self._set_running(True)
        left = f" ({len(self.queue)} more after this one)" if self.queue else ""
        self.status_label.setText(f"Starting{left}…")
        QgsApplication.taskManager().addTask(task)
        return task

    def cancel(self) -> None:
        if self.task is not None:
            self.queue = []
            self.status_label.setText("Cancelling…")
            self.task.cancel()

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        self.report_button.setEnabled(self.report_path is not None and not running)
        self.progress.setValue(0)

    def _succeeded(self, event: dict, label: str, spec: PipelineFile | None = None, area: Area | None = None,
                   location: EngineLocation | None = None) -> None:
        self.task = None
        self._set_running(False)
        self.progress.setValue(100)
        gpkg = event.get("outputs", {}).get("gpkg")
        if not gpkg:
            self.status_label.setText("The engine finished but reported no GeoPackage.")
            return
        summary = event.get("summary", {})
        attribution = summary.get("attribution", "")  # labels from OSM
        model = event.get("outputs", {}).get("model")
        kept = None
        if model and spec is not None and spec.model is None and Path(model).is_dir():  # trained in this run
            kept = keep_model(Path(model), models_dir(), spec.task, name=next_version(spec.base) if spec.base else None)
            self.refresh_models(select=kept)
        used = kept or (Path(model) if model else None)  # the model that mapped the results
        title = task_info(spec.task).label if spec is not None else label.capitalize()
        title += f" ({area.name})" if area is not None and area.name and self.batch else ""
        group = group_name(title, area.hectares() if area is not None else 0.0, model_label(used), datetime.now())
        layers = load_result_layers(gpkg, group, attribution=attribution)
        self.results = Results(Path(gpkg), layers, group, spec, area, used)
        crowns = self.results.crowns()
        if crowns is not None:
            self.results.crowns_at_load = crown_hashes(crowns)
        self.export_button.setEnabled(True)
        self.retrain_button.setEnabled(crowns is not None and used is not None and spec is not None)
        credit = f". Labels: data {attribution} (ODbL)" if attribution else ""
        trained = training_text(summary.get("train", {}))
        workers = job.workers_note(summary)
        saved = f"; model saved as {kept.name}" if kept else ""
        compared = summary.get("train", {}).get("compared")
        if kept and compared:  # a retraining on corrections: how the score changed on the reviewed area
            saved = (f"; {kept.name}: crown F1 on the reviewed area {compared['base'].get('crown_f1', 0):.2f} "
                     f"({model_label(spec.base)}) → {compared['new'].get('crown_f1', 0):.2f}")
        classes = (summary.get("predict") or {}).get("hectares")
        mapped = f"; {class_hectares_text(classes)}" if isinstance(classes, dict) and classes else ""
        self.status_label.setText(f"Done: {len(layers)} layers in {Path(gpkg).name}{mapped}{saved}{workers}"
                                  f"{trained}{credit}")
        folder = used if used is None or used.is_dir() else used.parent
        card = folder / "MODEL_CARD.md" if folder is not None else None
        self.report_path = card if card and card.is_file() else None
        self.report_button.setEnabled(self.report_path is not None)
        if self.queue and location is not None:
            self._start_next(location)

    def _show_report_of(self, model: ModelSummary | None) -> None:
        self.report_path = model.report if model else None
        self.report_button.setEnabled(self.report_path is not None and self.task is None)

    def draw_reviewed_area(self) -> None:
        self._reviewing = True
        self._start_tool(self.polygon_tool, "Click the corners of the area you reviewed; right-click to close it.")

    def retrain_with_corrections(self, reviewed: Area | None = None) -> EngineTask | None:
        """Fine-tune the model that mapped the last results on the user's corrected crowns inside the
        reviewed area (the current map extent by default), then map the area again; the task or None."""
        results, location = self.results, self.check_engine()
        crowns = results.crowns() if results is not None else None
        if results is None or crowns is None or results.model is None or results.spec is None \
                or location is None or self.task is not None:
            return None
        reviewed = reviewed or Area(QgsGeometry.fromRect(self.canvas.extent()),
                                    self.canvas.mapSettings().destinationCrs(), "map extent", "polygon")
        reviewed = dataclasses.replace(reviewed, kind="polygon")  # the engine gets it as a file: its CRS travels
        if crowns.isEditable() and crowns.isModified():
            crowns.commitChanges(False)  # the edits are what the user asks to train on; editing goes on
        in_layer = QgsGeometry(reviewed.geometry)
        in_layer.transform(QgsCoordinateTransform(reviewed.crs, crowns.crs(), QgsProject.instance()))
        before = sorted(h for h, g in results.crowns_at_load if g.intersects(in_layer))
        if sorted(h for h, _ in crown_hashes(crowns, in_layer)) == before:
            self.status_label.setText("No crown was corrected in the reviewed area: delete false crowns, draw "
                                      "the missed ones or reshape them in the crowns layer, then retrain.")
            return None
        out_dir = results.gpkg.parent
        try:
            labels = labels_for_engine(crowns, out_dir / "trees-work")
            area, _ = reviewed.for_engine(out_dir / "areas")
        except (SourceError, OSError) as exc:
            self.status_label.setText(str(exc))
            return None
        spec = dataclasses.replace(
            results.spec, labels=labels, class_field=None, preset=None, osm_file=None, overpass=None, date=None,
            model=None, base=results.model, reviewed_area=area, epochs=self.epochs_spin.value(),
            out=out_dir / f"trees-{time.strftime('%Y%m%d-%H%M%S')}-{next_version(results.model)}.gpkg")
        self.queue = [(spec, results.area)]
        return self._start_next(location)

    def export_result_map(self) -> MapFiles | None:
        """The last results as a map for a report (legend, scale bar, north arrow, credits) over the
        imagery: a PDF and a PNG beside the result GeoPackage."""
        if self.results is None:
            return None
        gpkg, layers, title = self.results.gpkg, self.results.layers, self.results.title
        imagery = self.imagery_combo.currentLayer()
        try:
            layout = build_layout(QgsProject.instance(), layers, title, [imagery] if imagery is not None else [])
            files = export_map(layout, gpkg.with_name(f"{gpkg.stem}-map.pdf"), gpkg.with_name(f"{gpkg.stem}-map.png"))
        except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: the user removed the layers
            self.status_label.setText(f"The map could not be exported: {exc}")
            return None
        self.status_label.setText(f"Map exported: {files.pdf} and {files.png.name}")
        return files

    def open_report(self) -> None:
        if self.report_path is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.report_path)))

    def open_help(self) -> None:
        readme = find_resource("README.md")
        url = QUrl.fromLocalFile(str(readme)) if readme else QUrl("https://example.invalid/landcover_plugin")
        url.setFragment(HELP_ANCHOR.lstrip("#"))
        QDesktopServices.openUrl(url)

    def _failed(self, failure: EngineFailed) -> None:
        self.task = None
        self.queue = []
        self._set_running(False)
        self.status_label.setText(job.dock_words(str(failure)))

    def cleanup(self) -> None:
        """Undo what the dock did to the canvas and stop its engine (plugin unload)."""
        if self.task is not None:
            self.task.on_success = self.task.on_failure = None  # the dock is going away
            self.task.cancel()
        if self.canvas.mapTool() in (self.map_tool, self.polygon_tool):
            self.canvas.unsetMapTool(self.canvas.mapTool())
        self.canvas.destinationCrsChanged.disconnect(self._show_area)
        self.rubber_band.reset(QgsWkbTypes.GeometryType.PolygonGeometry)
        self.canvas.scene().removeItem(self.rubber_band)
        self.canvas.scene().removeItem(self.polygon_tool.band)


def menu_button(text: str, name: str, tooltip: str, click: Callable[[], object],
                items: tuple[tuple[str, Callable[[], object], str], ...]) -> QToolButton:
    """A button that does `click`, with an arrow offering `items` (text, what it does, object name)."""
    button = QToolButton(objectName=name, text=text)
    button.setPopupMode(QToolButton.ToolButtonPopupMode.MenuButtonPopup)
    button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextOnly)
    button.setToolTip(tooltip)
    button.clicked.connect(lambda: click())  # not clicked's `checked` as the slot's first argument
    menu = QMenu(button)
    for label, slot, object_name in items:
        action = menu.addAction(label)
        action.setObjectName(object_name)
        action.triggered.connect(lambda _checked=False, f=slot: f())
    button.setMenu(menu)
    return button


def _safe(name: str) -> str:
    """A feature's name as part of a file name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40]
