"""Every Qt name the plugin uses exists in PyQt6, so the plugin loads in QGIS 4 (Qt 6)
while QGIS 3.22 (PyQt5 5.15, which accepts the same scoped names) keeps working.

Runs in the engine's venv, where PyQt6 is pinned (requirements/test-engine.txt): no
QGIS is needed, and Qt 5 and Qt 6 never share a process. The source is read with
`ast`: each name imported from `qgis.PyQt.<module>` and each attribute chain on it
(`Qt.DockWidgetArea.RightDockWidgetArea`, `QMessageBox.StandardButton.Yes`) is looked
up in `PyQt6.<module>`. PyQt6 has no unscoped enum members (`QMessageBox.Yes`) and no
`exec_()`, so either fails here. Imports in an `except ImportError:` block are the
Qt 5 fallback of a `try:` that Qt 6 takes, and are not checked.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parents[2] / "landcover_plugin"


def plugin_sources() -> list[str]:
    """The QGIS shell's files; the engine and the contract never import Qt."""
    return sorted(str(p.relative_to(PLUGIN)) for p in PLUGIN.rglob("*.py")
                  if p.relative_to(PLUGIN).parts[0] not in ("engine", "contract"))


def _fallback_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside `except ImportError` handlers (the Qt 5 branch)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            caught = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
            if any(isinstance(c, ast.Name) and c.id in ("ImportError", "ModuleNotFoundError") for c in caught):
                skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


def _chain(node: ast.Attribute) -> tuple[str, list[str]] | None:
    """`A.b.c` -> ("A", ["b", "c"]); None when the chain does not start at a name."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    return (node.id, attrs[::-1]) if isinstance(node, ast.Name) else None


def qt6_problems(source: str) -> list[str]:
    """What in `source` would fail under PyQt6, one line each (line number first)."""
    tree = ast.parse(source)
    skipped = _fallback_nodes(tree)
    roots: dict[str, object] = {}  # local name -> the PyQt6 object it stands for
    problems = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            problems += [f"{node.lineno}: import {a.name} (Qt only through qgis.PyQt)"
                         for a in node.names if a.name.split(".")[0] in ("PyQt5", "PyQt6", "sip")]
        if not isinstance(node, ast.ImportFrom) or not node.module:
            continue
        module = node.module
        if module.split(".")[0] in ("PyQt5", "PyQt6"):
            problems.append(f"{node.lineno}: from {module} import ... (Qt only through qgis.PyQt)")
        elif module == "qgis.PyQt" or module.startswith("qgis.PyQt."):
            target = importlib.import_module(module.replace("qgis.PyQt", "PyQt6", 1))
            for alias in node.names:
                found = getattr(target, alias.name, None)
                if found is None and module == "qgis.PyQt":  # a submodule: QtCore, sip
                    found = importlib.import_module(f"PyQt6.{alias.name}")
                if found is None:
                    problems.append(f"{node.lineno}: {alias.name} is not in PyQt6's {target.__name__}")
                else:
                    roots[alias.asname or alias.name] = found
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in skipped:
            continue
        if node.attr == "exec_":
            problems.append(f"{node.lineno}: exec_() (PyQt6 has only exec())")
        chain = _chain(node)  # `A.b` inside `A.b.c` is checked too: it fails first, the same message
        if chain is None or chain[0] not in roots:
            continue
        obj, path = roots[chain[0]], chain[0]
        for attr in chain[1]:
            path += "." + attr
            if not hasattr(obj, attr):
                problems.append(f"{node.lineno}: {path} does not exist in PyQt6")
                break
            obj = getattr(obj, attr)
    return sorted(set(problems), key=lambda p: int(p.split(":")[0]))


@pytest.mark.parametrize("name", plugin_sources())
def test_every_qt_name_exists_in_pyqt6(name):
    problems = qt6_problems((PLUGIN / name).read_text())
    assert not problems, f"{name}:\n" + "\n".join(problems)


def test_unscoped_enums_exec_and_direct_imports_are_caught():
    source = ("from qgis.PyQt.QtCore import Qt\n"
              "from qgis.PyQt.QtWidgets import QAction, QMessageBox\n"
              "from PyQt5.QtCore import QUrl\n"
              "Qt.RightDockWidgetArea\n"
              "QMessageBox.Yes\n"
              "QMessageBox.StandardButton.Yes\n"
              "Qt.ItemDataRole.ToolTipRole\n"
              "dialog.exec_()\n")
    assert qt6_problems(source) == [
        "2: QAction is not in PyQt6's PyQt6.QtWidgets",
        "3: from PyQt5.QtCore import ... (Qt only through qgis.PyQt)",
        "4: Qt.RightDockWidgetArea does not exist in PyQt6",
        "5: QMessageBox.Yes does not exist in PyQt6",
        "8: exec_() (PyQt6 has only exec())",
    ]


def test_the_qt5_fallback_of_a_qt6_import_is_not_checked():
    source = ("try:\n"
              "    from qgis.PyQt.QtGui import QAction\n"
              "except ImportError:\n"
              "    from qgis.PyQt.QtWidgets import QAction\n"
              "QAction.MenuRole.NoRole\n")
    assert qt6_problems(source) == []
