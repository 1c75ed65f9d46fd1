"""The dialog that adds a GPU host to train on: a name, the ssh destination, a key file."""
from __future__ import annotations

from qgis.gui import QgsFileWidget
from qgis.PyQt.QtWidgets import QDialog, QDialogButtonBox, QFormLayout, QLabel, QLineEdit, QWidget

from ..core.remote_hosts import RemoteHost


class HostDialog(QDialog):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Add a GPU host")
        self.setMinimumWidth(480)  # the destination examples readable
        form = QFormLayout(self)
        intro = QLabel("A machine you reach with ssh (a lab GPU workstation, a cloud GPU machine, a cluster's "
                       "login node). Your ssh config, agent and known hosts apply; keys only, no passwords. "
                       "'Test connection' then installs the Landcover engine there.", wordWrap=True)
        form.addRow(intro)
        self.name_edit = QLineEdit(objectName="hostName", placeholderText="gpu-lab")
        self.name_edit.setToolTip("The name the dock shows.")
        form.addRow("Name", self.name_edit)
        self.destination_edit = QLineEdit(objectName="hostDestination",
                                          placeholderText="user@gpu.example.org, or a Host of ~/.ssh/config")
        self.destination_edit.setToolTip("What you would type after `ssh`: user@host, ssh://user@host:port, or "
                                         "a Host entry of your ssh config (with its ProxyJump, port and key).")
        form.addRow("SSH destination", self.destination_edit)
        self.key_file = QgsFileWidget(objectName="hostKey")
        self.key_file.setToolTip("Optional: your private key file for this host, if your ssh agent or config "
                                 "does not already provide it. Only its path is stored.")
        form.addRow("Key file", self.key_file)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def host(self) -> RemoteHost | None:
        """The host entered, or None when the name or destination is missing."""
        name, destination = self.name_edit.text().strip(), self.destination_edit.text().strip()
        if not name or not destination:
            return None
        return RemoteHost(name, destination, self.key_file.filePath().strip())
