"""Presets: editable YAML files that turn OpenStreetMap tags into label classes.

A preset (resources/presets/NAME.yaml) lists classes, each with a colour, a
priority (higher is drawn on top where labels overlap) and rules. A rule
matches a feature when all its tags match ("a|b": any of these values, "*":
any value). A rule with `buffer` (metres) takes lines and points and widens
them into polygons (roads, rivers, tree rows, single trees); a rule without
one takes areas. A rule may override its class's priority.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...contract.names import PRESETS_DIR
from ..errors import EngineError

ANY = "*"


@dataclass(frozen=True)
class Rule:
    class_name: str
    tags: dict[str, tuple[str, ...]]  # key -> accepted values; ("*",) for any value
    priority: int
    buffer: float | None = None  # metres; None: areas only

    def matches(self, tags: dict[str, str]) -> bool:
        return all(k in tags and (values == (ANY,) or tags[k] in values) for k, values in self.tags.items())


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    task: str
    class_names: list[str]
    class_colors: list[str]
    rules: list[Rule]  # highest priority first: a feature takes the first rule it matches

    @property
    def keys(self) -> list[str]:
        return sorted({k for r in self.rules for k in r.tags})

    def classify(self, tags: dict[str, str], linear: bool) -> Rule | None:
        """The rule for a feature: buffered rules take lines/points (`linear`), others take areas."""
        for rule in self.rules:
            if (rule.buffer is not None) == linear and rule.matches(tags):
                return rule
        return None

    def color(self, class_name: str) -> str:
        return self.class_colors[self.class_names.index(class_name)]


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name_or_path: str | Path) -> Preset:
    """A preset by name (resources/presets/NAME.yaml) or by file path."""
    import yaml

    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise EngineError("UNKNOWN_PRESET", f"No preset '{name_or_path}'.",
                          f"Use one of {', '.join(available_presets())}, or the path of a preset YAML file.")
    try:
        doc = yaml.safe_load(path.read_text())
        return _parse(doc, path.stem)
    except (yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise EngineError("BAD_PRESET", f"Preset {path} is not valid: {type(exc).__name__}: {exc}",
                          "See resources/presets/landcover.yaml for the format.") from None


def _values(value) -> tuple[str, ...]:
    return tuple(str(value).split("|"))


def _parse(doc: dict, default_name: str) -> Preset:
    names, colors, rules = [], [], []
    for cls in doc["classes"]:
        names.append(str(cls["name"]))
        colors.append(str(cls["color"]))
        for rule in cls["rules"]:
            buffer = rule.get("buffer")
            rules.append(Rule(str(cls["name"]), {str(k): _values(v) for k, v in rule["tags"].items()},
                              int(rule.get("priority", cls.get("priority", 0))),
                              float(buffer) if buffer is not None else None))
    if not rules:
        raise ValueError("no rules")
    rules.sort(key=lambda r: -r.priority)  # stable: file order among equals
    return Preset(str(doc.get("name", default_name)), str(doc.get("description", "")),
                  str(doc.get("task", "landcover")), names, colors, rules)
