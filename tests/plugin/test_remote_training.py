"""Training on a GPU host from the dock and from Processing (real QGIS, a real sshd on 127.0.0.1).

The host is this machine through tests/ssh_server.py; the engine's ssh config comes from
LANDCOVER_SSH_CONFIG, so the user's ~/.ssh is never touched.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from qgis.core import QgsSettings
from qgis.PyQt.QtWidgets import QMessageBox

from landcover_plugin.core.remote_hosts import HOSTS_SETTING, RemoteHost, fingerprint_in, load_hosts
from landcover_plugin.ui.dock import LandcoverDock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ssh_server import SHARED_REMOTE_HOME, start_ssh_server  # noqa: E402
from test_dock import dock, osbs_layers, start_trees_run  # noqa: E402,F401  (fixtures)
from test_processing import ALG_ID, RecordingFeedback, _context, _extent, alg  # noqa: E402,F401

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_ssh_server(tmp_path_factory.mktemp("gpu-host"), SHARED_REMOTE_HOME)
    yield server
    server.stop()


@pytest.fixture
def ssh_config(server, monkeypatch):
    monkeypatch.setenv("LANDCOVER_SSH_CONFIG", str(server.ssh_config))
    yield server
    QgsSettings().remove(HOSTS_SETTING)


def test_hosts_are_kept_in_the_settings(dock, qgis_iface):
    QgsSettings().remove(HOSTS_SETTING)
    assert [dock.train_on_combo.itemText(i) for i in range(dock.train_on_combo.count())] == ["this computer"]
    assert not dock.test_host_button.isEnabled()
    dock.add_host(RemoteHost("gpu-lab", "me@gpu.example.org", "keys/id_lab"))
    dock.add_host(RemoteHost("gpu-lab", "me@gpu2.example.org"))  # the same name: replaced
    assert dock.remote_host() == RemoteHost("gpu-lab", "me@gpu2.example.org")
    again = LandcoverDock(qgis_iface, qgis_iface.mainWindow())  # after a restart
    try:
        assert [again.train_on_combo.itemText(i) for i in range(again.train_on_combo.count())] == \
            ["this computer", "gpu-lab"]
    finally:
        again.cleanup()
        again.deleteLater()
    dock.set_label_source("model")  # predicting only: where to train does not apply
    assert dock.train_on_row.isHidden()
    QgsSettings().remove(HOSTS_SETTING)


def test_a_malformed_hosts_setting_is_no_host():
    QgsSettings().setValue(HOSTS_SETTING, "{not json")
    assert load_hosts(QgsSettings()) == []
    QgsSettings().remove(HOSTS_SETTING)


def test_connect_trust_and_train_on_the_host_from_the_dock(dock, ssh_config, osbs_layers, tmp_path, wait_until,
                                                           monkeypatch):
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda parent, title, text, *a: asked.append(text) or
                        QMessageBox.Yes)
    dock.add_host(RemoteHost("gpu-test", "gpu-test"))
    assert dock.test_connection() is not None
    assert wait_until(lambda: dock.connection_task is None and "ready" in dock.status_label.text(), 1800), \
        dock.status_label.text()
    expected = subprocess.run(["ssh-keygen", "-lf", str(ssh_config.folder / "host_key.pub")],
                                            capture_output=True, text=True).stdout.split()[1]
    assert len(asked) == 1 and fingerprint_in(asked[0]) == expected  # the user saw the key before trusting it
    assert "no GPU: training will use the CPU" in dock.status_label.text()

    task = start_trees_run(dock, osbs_layers, tmp_path)
    stages = []
    task.stage_changed.connect(stages.append)
    assert wait_until(lambda: dock.task is None, 600), dock.status_label.text()
    assert dock.status_label.text().startswith("Done"), dock.status_label.text()
    assert any("on gpu-test, CPU" in text for text in stages), stages  # where the training ran
    assert (tmp_path / "trees-work" / "model" / "model.onnx").is_file()


def test_processing_trains_on_a_host_saved_in_the_dock(alg, qgis_new_project, engine_python, ssh_config,
                                                       osbs_tif, osbs_csv, tmp_path):
    import processing

    key = (ssh_config.folder / "host_key.pub").read_text().split()
    with ssh_config.known_hosts.open("a") as known:  # trusted already (the dock test asks)
        known.write(f"[127.0.0.1]:{ssh_config.port} {key[0]} {key[1]}\n")

    from landcover_plugin.core.remote_hosts import save_hosts

    params = {"IMAGERY": str(osbs_tif), "LABELS_FILE": str(osbs_csv), "EXTENT": _extent(osbs_tif), "TASK": 0,
              "EPOCHS": 1, "OUTPUT": str(tmp_path / "trees.gpkg"), "REMOTE_HOST": "lab"}
    save_hosts(QgsSettings(), [RemoteHost("lab", "gpu-test", "/keys/lab key")])
    spec = alg.create().build_spec(params, _context())
    assert spec.remote == "gpu-test" and spec.ssh_identity == Path("/keys/lab key")
    assert alg.create().build_spec({**params, "REMOTE_HOST": "me@other"}, _context()).remote == "me@other"

    save_hosts(QgsSettings(), [RemoteHost("lab", "gpu-test")])
    feedback = RecordingFeedback()
    results = processing.run(ALG_ID, params, context=_context(), feedback=feedback)
    assert Path(results["OUTPUT"]).is_file()
    assert any(info.startswith("Done: ") and "trained on gpu-test" in info for info in feedback.infos), \
        feedback.infos[-10:]
