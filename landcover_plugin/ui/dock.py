"""The Landcover dock: area, imagery, task, labels or model, Run/Cancel.

It only gathers the user's choices into a pipeline file and starts an
EngineTask; the work happens in the engine's own process.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from qgis.core import (QgsApplication, QgsCoordinateReferenceSystem, QgsGeometry, QgsMapLayerProxyModel, QgsProject,
                       QgsRectangle, QgsSettings, QgsWkbTypes)
from qgis.gui import (QgsDockWidget, QgsDoubleSpinBox, QgsFieldComboBox, QgsFileWidget, QgsMapLayerComboBox,
                      QgsMapToolExtent, QgsRubberBand)
from qgis.PyQt.QtCore import Qt, QUrl
from qgis.PyQt.QtGui import QColor, QDesktopServices
from qgis.PyQt.QtWidgets import (QComboBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QMessageBox,
                                 QProgressBar, QPushButton, QSpinBox, QVBoxLayout, QWidget)

from ..contract.names import OSM_ATTRIBUTION, OVERPASS_DEFAULT
from ..contract.pipeline_file import PipelineFile
from ..contract.runner import EngineFailed
from ..contract.tasks import TASKS, presets_for_task
from ..contract.tasks import task as task_info
from ..core import job
from ..core.engine_env import EngineLocation, check_engine, plan_env, requirement_files, user_venv
from ..core.layers import load_result_layers
from ..core.locate import engine_location, user_data_dir
from ..core.remote_hosts import RemoteHost, fingerprint_in, load_hosts, save_hosts, setup_run, with_host
from ..core.setup_task import CreateEnvTask
from ..core.sources import ImagerySource, SourceError, raster_layer_source, vector_layer_path, xyz_connections
from ..core.task import EngineTask, training_text
from .host_dialog import HostDialog

XYZ_PREFIX = "XYZ: "
OVERPASS_SETTING = "landcover/overpass_url"


def default_output_dir() -> Path:
    home = QgsProject.instance().homePath()
    return Path(home) / "landcover" if home else Path(tempfile.gettempdir()) / "landcover"


class LandcoverDock(QgsDockWidget):
    def __init__(self, iface, parent: QWidget | None = None) -> None:
        super().__init__("Landcover", parent)
        self.setObjectName("LandcoverDock")
        self.iface = iface
        self.canvas = iface.mapCanvas()
        self.task: EngineTask | None = None
        self.env_task: CreateEnvTask | None = None
        self.connection_task: EngineTask | None = None
        self.area: QgsRectangle | None = None  # in area_crs (the canvas CRS when drawn)
        self.area_crs = QgsCoordinateReferenceSystem()
        self._xyz: dict[str, ImagerySource] = {}
        self._previous_tool = None
        self.map_tool = QgsMapToolExtent(self.canvas)
        self.map_tool.extentChanged.connect(self.set_area)
        self.rubber_band = QgsRubberBand(self.canvas, QgsWkbTypes.PolygonGeometry)
        self.rubber_band.setColor(QColor(255, 140, 0, 200))
        self.rubber_band.setFillColor(QColor(255, 140, 0, 30))
        self.rubber_band.setWidth(2)
        self.canvas.destinationCrsChanged.connect(self._show_area)  # the band is drawn in map coordinates
        self._build()
        self.refresh_sources()
        self.check_engine()

    # ---- widgets -------------------------------------------------------
    def _build(self) -> None:
        body = QWidget(self)
        outer = QVBoxLayout(body)
        intro = QLabel("Draw an area, choose the imagery and what to map, then press Run. Training and "
                       "prediction run in the Landcover engine, outside QGIS; results arrive as styled layers.")
        intro.setWordWrap(True)
        outer.addWidget(intro)

        self.engine_label = QLabel(objectName="engineMessage", wordWrap=True)
        self.engine_label.setStyleSheet("color: #a40000")
        self.create_env_button = QPushButton("Create environment", objectName="createEnvButton")
        self.create_env_button.setToolTip("Create the engine's own Python environment in your QGIS profile and "
                                          "install its packages with pip (about 1 GB; QGIS's Python is not touched).")
        self.create_env_button.clicked.connect(self.create_environment)
        outer.addWidget(self.engine_label)
        outer.addWidget(self.create_env_button)

        form = QFormLayout()
        outer.addLayout(form)

        self.draw_button = QPushButton("Draw rectangle", objectName="drawButton")
        self.draw_button.setToolTip("Drag a rectangle on the map: the area to map (and to train on).")
        self.draw_button.clicked.connect(self.start_drawing)
        self.area_label = QLabel("No area drawn", objectName="areaLabel", wordWrap=True)
        self.area_label.setToolTip("The drawn area, in the map's CRS.")
        row = QHBoxLayout()
        row.addWidget(self.draw_button)
        row.addWidget(self.area_label, 1)
        form.addRow("Area", row)

        self.imagery_combo = QgsMapLayerComboBox(objectName="imageryCombo")
        self.imagery_combo.setFilters(QgsMapLayerProxyModel.RasterLayer)
        self.imagery_combo.setToolTip("Imagery to map: a raster layer of the project (a file) or an XYZ tile "
                                      "connection saved in QGIS (Browser > XYZ Tiles), fetched for the area.")
        self.imagery_combo.currentIndexChanged.connect(self._imagery_changed)
        form.addRow("Imagery", self.imagery_combo)

        self.gsd_spin = QgsDoubleSpinBox(objectName="gsdSpin")
        self.gsd_spin.setRange(0.0, 1000.0)
        self.gsd_spin.setDecimals(2)
        self.gsd_spin.setSuffix(" m/px")
        self.gsd_spin.setSpecialValueText("automatic")
        self.gsd_spin.setClearValue(0.0)
        self.gsd_spin.setToolTip("For XYZ tiles: the ground resolution to fetch (the nearest zoom level is used). "
                                 "'automatic' lets the engine pick one (the model's resolution when predicting).")
        form.addRow("Resolution", self.gsd_spin)

        self.task_combo = QComboBox(objectName="taskCombo")
        for t in TASKS:
            self.task_combo.addItem(t.label, t.id)
        self.task_combo.setToolTip(" ".join(f"{t.label}: {t.help}." for t in TASKS))
        form.addRow("Task", self.task_combo)

        self.label_source_combo = QComboBox(objectName="labelSourceCombo")
        for key, label in job.LABEL_SOURCES.items():
            self.label_source_combo.addItem(label, key)
        self.set_label_source("overpass")  # a first map needs nothing but the area
        self.label_source_combo.setToolTip(
            "Where the training labels come from: OpenStreetMap features of a preset, downloaded for the area "
            "from an Overpass server or read from a local OSM file; your own vector layer or file (with a class "
            f"field for land cover); or no labels, to predict with an existing model. OSM data is {OSM_ATTRIBUTION}"
            ", ODbL: the results say so.")
        form.addRow("Labels from", self.label_source_combo)

        self.preset_combo = QComboBox(objectName="presetCombo")
        self.preset_combo.setToolTip("Which OpenStreetMap features become which classes: an editable file in the "
                                     "plugin's resources/presets/ (tag filters, buffers for lines, priorities, "
                                     "colours). Only presets that fit the task are listed.")
        form.addRow("OSM preset", self.preset_combo)

        self.overpass_edit = QLineEdit(objectName="overpassEdit")
        self.overpass_edit.setText(str(QgsSettings().value(OVERPASS_SETTING, OVERPASS_DEFAULT)))
        self.overpass_edit.setPlaceholderText(OVERPASS_DEFAULT)
        self.overpass_edit.setToolTip("The Overpass API interpreter URL the OSM features are queried from (the "
                                      "public one by default; use your own or a mirror for large or frequent "
                                      "jobs). Remembered for next time.")
        self.overpass_edit.editingFinished.connect(self._remember_overpass)
        form.addRow("Overpass server", self.overpass_edit)

        self.date_edit = QLineEdit(objectName="dateEdit")
        self.date_edit.setPlaceholderText("YYYY-MM-DD (optional: today's OSM)")
        self.date_edit.setToolTip("Optional: take OSM as it was on this day, ideally the imagery's date, so that "
                                  "labels show what the image shows (Overpass [date:]). Empty: the current map.")
        form.addRow("OSM date", self.date_edit)

        self.osm_file = QgsFileWidget(objectName="osmFile")
        self.osm_file.setFilter("OpenStreetMap files (*.osm *.pbf *.bz2)")
        self.osm_file.setToolTip("A local OpenStreetMap extract (.osm, .osm.pbf, .osm.bz2), e.g. from Geofabrik: "
                                 "no server needed; its features of the preset inside the area become the labels.")
        form.addRow("OSM file", self.osm_file)

        self.labels_combo = QgsMapLayerComboBox(objectName="labelsCombo")
        self.labels_combo.setFilters(QgsMapLayerProxyModel.VectorLayer)
        self.labels_combo.setAllowEmptyLayer(True)
        self.labels_combo.setLayer(None)
        self.labels_combo.setToolTip("Training labels: crown polygons or boxes (trees), or polygons with a class "
                                     "attribute (land cover). Leave empty to predict with a model file instead.")
        form.addRow("Labels", self.labels_combo)

        self.class_field_combo = QgsFieldComboBox(objectName="classFieldCombo")
        self.class_field_combo.setAllowEmptyFieldName(True)
        self.class_field_combo.setToolTip("Land cover: the labels' attribute holding the class name.")
        self.labels_combo.layerChanged.connect(self.class_field_combo.setLayer)
        form.addRow("Class field", self.class_field_combo)

        self.model_file = QgsFileWidget(objectName="modelFile")
        self.model_file.setFilter("ONNX models (*.onnx)")
        self.model_file.setToolTip("Or an existing model (.onnx, e.g. from an earlier run's work folder): "
                                   "predict without training.")
        form.addRow("Or model", self.model_file)
        self._form = form
        # Choosing a layer or a model file says where the labels come from.
        self.labels_combo.layerChanged.connect(lambda layer: layer is not None and self.set_label_source("layer"))
        self.model_file.fileChanged.connect(lambda path: bool(path.strip()) and self.set_label_source("model"))
        self.label_source_combo.currentIndexChanged.connect(self._label_source_changed)
        self.task_combo.currentIndexChanged.connect(self._fill_presets)
        self._fill_presets()

        self.epochs_spin = QSpinBox(objectName="epochsSpin")
        self.epochs_spin.setRange(1, 1000)
        self.epochs_spin.setValue(job.QUICK_EPOCHS)
        self.epochs_spin.setToolTip("Training passes over the labelled chips: more is slower and usually better.")
        form.addRow("Epochs", self.epochs_spin)

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
        form.addRow("Train on", self.train_on_row)
        self.train_on_combo.currentIndexChanged.connect(
            lambda *_: self.test_host_button.setEnabled(self.remote_host() is not None))
        self._fill_hosts()
        self._label_source_changed()

        self.scheduler_edit = QLineEdit(objectName="schedulerEdit")
        self.scheduler_edit.setText(job.scheduler_setting() or "")
        self.scheduler_edit.setPlaceholderText("optional: tcp://HOST:8786")
        self.scheduler_edit.setToolTip("Optional: a Dask scheduler (tcp://HOST:PORT, or tls:// with Dask's TLS "
                                       "configuration) whose workers predict, for areas one machine is too slow "
                                       "for; they must read the imagery and model at the same paths. Empty: "
                                       "this machine. Remembered, and used by Processing too.")
        self.scheduler_edit.editingFinished.connect(self._remember_scheduler)
        form.addRow("Dask scheduler", self.scheduler_edit)

        self.out_dir = QgsFileWidget(objectName="outputDir")
        self.out_dir.setStorageMode(QgsFileWidget.GetDirectory)
        self.out_dir.setFilePath(str(default_output_dir()))
        self.out_dir.setToolTip("Folder for the result GeoPackage, the pipeline file and intermediate files "
                                "(a rerun reuses finished stages).")
        form.addRow("Output folder", self.out_dir)

        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run", objectName="runButton")
        self.run_button.setToolTip("Fetch the imagery, train on the labels (or load the model), predict, "
                                   "and load the results as styled layers.")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel", objectName="cancelButton", enabled=False)
        self.cancel_button.setToolTip("Stop the engine; nothing half-written is kept.")
        self.cancel_button.clicked.connect(self.cancel)
        self.report_button = QPushButton("Open report", objectName="reportButton", enabled=False)
        self.report_button.setToolTip("The trained model's card: validation scores (per class and the confusion "
                                      "matrix for land cover), the training curves' file, what it was trained on.")
        self.report_button.clicked.connect(self.open_report)
        self.report_path: Path | None = None
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.report_button)
        outer.addLayout(buttons)

        self.progress = QProgressBar(objectName="progressBar")
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        outer.addWidget(self.progress)
        self.status_label = QLabel("", objectName="statusLabel", wordWrap=True)
        self.status_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        outer.addWidget(self.status_label)
        outer.addStretch(1)
        self.setWidget(body)
        self._imagery_changed()

    # ---- inputs --------------------------------------------------------
    def refresh_sources(self) -> None:
        """Re-read the XYZ connections saved in QGIS into the imagery combo."""
        self._xyz = xyz_connections()
        self.imagery_combo.setAdditionalItems([XYZ_PREFIX + name for name in sorted(self._xyz)])

    def _imagery_changed(self, *_args) -> None:
        self.gsd_spin.setEnabled(self.imagery_combo.currentLayer() is None)

    def label_source(self) -> str:
        return self.label_source_combo.currentData()

    def set_label_source(self, key: str) -> None:
        self.label_source_combo.setCurrentIndex(self.label_source_combo.findData(key))

    def _label_source_changed(self, *_args) -> None:
        """Show only the rows the chosen label source needs."""
        source = self.label_source()
        rows = {self.preset_combo: source in ("overpass", "osm_file"), self.overpass_edit: source == "overpass",
                self.date_edit: source == "overpass", self.osm_file: source == "osm_file",
                self.labels_combo: source == "layer", self.class_field_combo: source == "layer",
                self.model_file: source in ("layer", "model"), self.epochs_spin: source != "model",
                self.train_on_row: source != "model"}
        for widget, shown in rows.items():
            widget.setVisible(shown)
            self._form.labelForField(widget).setVisible(shown)

    def _fill_presets(self, *_args) -> None:
        """The presets that fit the task; the task's namesake (first) is chosen."""
        self.preset_combo.clear()
        for preset in presets_for_task(self.task_key()):
            self.preset_combo.addItem(preset.name, preset.name)
            self.preset_combo.setItemData(self.preset_combo.count() - 1, preset.description, Qt.ToolTipRole)

    def _remember_overpass(self) -> None:
        QgsSettings().setValue(OVERPASS_SETTING, self.overpass_edit.text().strip() or OVERPASS_DEFAULT)

    def _remember_scheduler(self) -> None:
        QgsSettings().setValue(job.SCHEDULER_SETTING, self.scheduler_edit.text().strip())

    def start_drawing(self) -> None:
        if self.canvas.mapTool() is not self.map_tool:
            self._previous_tool = self.canvas.mapTool()
        self.canvas.setMapTool(self.map_tool)
        self.status_label.setText("Drag a rectangle on the map.")

    def set_area(self, extent: QgsRectangle, crs: QgsCoordinateReferenceSystem | None = None) -> None:
        """Store the drawn area (in the canvas CRS unless `crs` is given) and show it."""
        if extent.isEmpty():
            return
        self.area = QgsRectangle(extent)
        self.area_crs = crs or self.canvas.mapSettings().destinationCrs()
        self._show_area()
        self.area_label.setText(_area_text(self.area, self.area_crs))
        self.area_label.setToolTip(f"The drawn area: {self.area.toString(6)} ({self.area_crs.authid() or 'map CRS'})")
        self.status_label.setText("")
        if self.canvas.mapTool() is self.map_tool:  # one rectangle, then back to what the user had
            if self._previous_tool is not None:
                self.canvas.setMapTool(self._previous_tool)
            else:
                self.canvas.unsetMapTool(self.map_tool)

    def _show_area(self) -> None:
        if self.area is not None:
            self.rubber_band.setToGeometry(QgsGeometry.fromRect(self.area), self.area_crs)

    def aoi(self) -> tuple[job.Bbox, str]:
        if self.area is None:
            return (0.0, 0.0, 0.0, 0.0), "EPSG:4326"
        return job.aoi_for_engine(self.area, self.area_crs, QgsProject.instance().transformContext())

    def imagery(self) -> ImagerySource | None:
        layer = self.imagery_combo.currentLayer()
        if layer is not None:
            return raster_layer_source(layer)
        text = self.imagery_combo.currentText()
        return self._xyz.get(text[len(XYZ_PREFIX):]) if text.startswith(XYZ_PREFIX) else None

    def task_key(self) -> str:
        return self.task_combo.currentData()

    def build_spec(self, out_dir: Path) -> PipelineFile:
        """The pipeline for the current inputs; raises SourceError for a layer the
        engine cannot read. Check job.problems(spec) before running it."""
        imagery = self.imagery()
        source = self.label_source()
        labels_layer = self.labels_combo.currentLayer() if source == "layer" else None
        model = self.model_file.filePath().strip() if source in ("layer", "model") else ""
        osm_file = self.osm_file.filePath().strip() if source == "osm_file" else ""
        overpass = (self.overpass_edit.text().strip() or OVERPASS_DEFAULT) if source == "overpass" else None
        aoi, aoi_crs = self.aoi()
        task = self.task_key()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        host, training = self.remote_host(), source != "model"
        return PipelineFile(
            task=task, aoi=aoi, aoi_crs=aoi_crs,
            imagery=imagery.source if imagery else "",
            headers=imagery.headers if imagery else {},
            gsd=(self.gsd_spin.value() or None) if imagery and imagery.is_xyz else None,
            labels=vector_layer_path(labels_layer) if labels_layer is not None else None,
            class_field=(self.class_field_combo.currentField() or None) if labels_layer is not None else None,
            model=Path(model) if model and labels_layer is None else None,
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
        if dialog.exec_() and dialog.host() is not None:
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
        if answer == QMessageBox.Yes:
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
        return None if message else location

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
        if answer != QMessageBox.Yes:
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
        """Validate, write the pipeline file and start the engine; the task or None."""
        if self.task is not None:
            return None
        location = self.check_engine()
        if location is None:
            self.status_label.setText(self.engine_label.text())
            return None
        out_dir = Path(self.out_dir.filePath().strip() or default_output_dir())
        try:
            spec = self.build_spec(out_dir)
        except SourceError as exc:
            self.status_label.setText(str(exc))
            return None
        problems = job.problems(spec)
        if problems:
            self.status_label.setText("\n".join(problems))
            return None
        if spec.overpass:
            self._remember_overpass()
        label = task_info(spec.task).label.lower()
        imagery = self.imagery()
        run = job.engine_run(spec, location, imagery.engine_env() if imagery else {})
        task = EngineTask(f"Landcover: {label}", run, message_bar=self.iface.messageBar(),
                          on_success=lambda event: self._succeeded(event, label), on_failure=self._failed)
        task.progressChanged.connect(lambda v: self.progress.setValue(int(v)))
        task.stage_changed.connect(self.status_label.setText)
        self.task = task
        self._set_running(True)
        self.status_label.setText(f"Running; pipeline: {job.pipeline_path(spec)}")
        QgsApplication.taskManager().addTask(task)
        return task

    def cancel(self) -> None:
        if self.task is not None:
            self.status_label.setText("Cancelling...")
            self.task.cancel()

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        self.report_button.setEnabled(self.report_path is not None and not running)
        self.progress.setValue(0)

    def _succeeded(self, event: dict, label: str) -> None:
        self.task = None
        self._set_running(False)
        self.progress.setValue(100)
        gpkg = event.get("outputs", {}).get("gpkg")
        if not gpkg:
            self.status_label.setText("The engine finished but reported no GeoPackage.")
            return
        attribution = event.get("summary", {}).get("attribution", "")  # labels from OSM
        layers = load_result_layers(gpkg, f"Landcover — {label} ({time.strftime('%H:%M')})",
                                    attribution=attribution)
        credit = f". Labels: data {attribution} (ODbL)" if attribution else ""
        trained = training_text(event.get("summary", {}).get("train", {}))
        workers = job.workers_note(event.get("summary", {}))
        self.status_label.setText(f"Done: {len(layers)} layers from {gpkg}{workers}{trained}{credit}")
        model = event.get("outputs", {}).get("model")
        card = Path(model) / "MODEL_CARD.md" if model else None
        self.report_path = card if card and card.is_file() else None
        self.report_button.setEnabled(self.report_path is not None)

    def open_report(self) -> None:
        if self.report_path is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.report_path)))

    def _failed(self, failure: EngineFailed) -> None:
        self.task = None
        self._set_running(False)
        self.status_label.setText(str(failure))

    def cleanup(self) -> None:
        """Undo what the dock did to the canvas and stop its engine (plugin unload)."""
        if self.task is not None:
            self.task.on_success = self.task.on_failure = None  # the dock is going away
            self.task.cancel()
        if self.canvas.mapTool() is self.map_tool:
            self.canvas.unsetMapTool(self.map_tool)
        self.canvas.destinationCrsChanged.disconnect(self._show_area)
        self.rubber_band.reset(QgsWkbTypes.PolygonGeometry)
        self.canvas.scene().removeItem(self.rubber_band)


def _area_text(rect: QgsRectangle, crs: QgsCoordinateReferenceSystem) -> str:
    """The area's size, short enough for the dock: '32 × 32 m (EPSG:32617)'."""
    unit, digits = ("°", 4) if crs.isGeographic() else (" m", 0)
    return f"{rect.width():.{digits}f} × {rect.height():.{digits}f}{unit} ({crs.authid() or 'map CRS'})"
