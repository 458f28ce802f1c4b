"""The run's config: defaults, then --preset, then --config YAML (the original layout, so the
published SimMIM YAMLs load unchanged), then --set KEY=VALUE, then the explicit command-line flags."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional

from ..config import Config, get_config, merge, set_key


def _decode(value: Any) -> Any:
    """What yacs does to YAML values: strings that read as Python literals become them ('1e-4' is a
    string to PyYAML but a float to the original config loader)."""
    if isinstance(value, Mapping):
        return {key: _decode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item) for item in value]
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def _load_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load``; malformed YAML is a one-line ValueError saying where (not PyYAML's report)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{what}: not valid YAML ({problem}{where})") from None


def read_yaml_config(path) -> Dict[str, Any]:
    """A config YAML as nested dicts; files named in its BASE list (relative to it) come first."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--config {path} is a folder; give a YAML file")
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"--config {path}: not a text file (expected a YAML config)") from None
    tree = _load_yaml(text, f"--config {path}") or {}
    if not isinstance(tree, Mapping):
        raise ValueError(f"--config {path}: expected a mapping of config keys, got {type(tree).__name__}")
    merged: Dict[str, Any] = {}
    for base in tree.pop("BASE", None) or []:
        if base:
            _deep_update(merged, read_yaml_config(path.parent / base))
    _deep_update(merged, _decode(tree))
    return merged


def _deep_update(target: Dict[str, Any], source: Mapping) -> None:
    for key, value in source.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = dict(value) if isinstance(value, Mapping) else value


def parse_assignment(text: str):
    """'TRAIN.BASE_LR=1e-4' -> ('TRAIN.BASE_LR', 0.0001): the value is read as YAML, then as yacs would."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set expects KEY=VALUE (e.g. TRAIN.BASE_LR=1e-4), got {text!r}")
    return key.strip(), _decode(_load_yaml(raw, f"--set {text}") if raw.strip() else "")


def given_texts(assignments: Iterable[str]) -> Dict[str, str]:
    """The text of each ``--set KEY=TEXT`` by key (the last wins, as in the config), for error messages
    that show a value as the user typed it ('1e-3', not 0.001)."""
    return {key.strip(): raw.strip() for key, _, raw in (text.partition("=") for text in assignments)}


def build_config(preset: Optional[str], config_file: Optional[str], assignments: Iterable[str] = (),
                 flags: Optional[Mapping[str, Any]] = None) -> Config:
    """``flags``: dotted keys set by dedicated command-line options (None values are left alone)."""
    if preset is None and config_file is None:
        from ..config import PRESETS

        raise ValueError(f"give --preset ({', '.join(PRESETS)}) or --config FILE")
    config = get_config(preset)
    if config_file is not None:
        config = merge(config, read_yaml_config(config_file))
    for text in assignments:
        config = set_key(config, *parse_assignment(text))
    for key, value in (flags or {}).items():
        if value is not None:
            config = set_key(config, key, value)
    return config
