"""Reading a study spec file: bounded YAML, the line of every key, ``load_spec``, ``KEY=VALUE`` items.

The YAML is composed with a bound on nesting depth and on size after alias expansion before any
Python object is built from it, so a small file cannot ask for gigabytes or overflow the stack.
Every ``SpecError`` from validation (:mod:`wavesweep.study.spec`) is reported with the file and
line of its key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from wavesweep.study.spec import SpecError, StudySpec, apply_overrides, spec_from_mapping

# Resource bounds of a spec file (the grid bound, MAX_GRID_POINTS, is checked by the spec itself).
MAX_YAML_DEPTH = 50  # nesting of mappings and lists
MAX_YAML_NODES = 100_000  # nodes after alias expansion (a real spec has under 200)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a bound on nesting depth (the composer recurses once per level)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):  # noqa: ANN001 (PyYAML's signature)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise SpecError((), f"nested deeper than {MAX_YAML_DEPTH} levels", line=mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_size(root: yaml.Node) -> int:
    """Nodes of the document once every alias is expanded, counted on the (small) node graph
    without expanding it; a ``SpecError`` above MAX_YAML_NODES or for a recursive alias."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active or depth > MAX_YAML_DEPTH:
            raise SpecError((), "a recursive YAML alias", line=node.start_mark.line + 1)
        active.add(key)
        n = 1
        if isinstance(node, yaml.MappingNode):
            n += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            n += sum(size(v, depth + 1) for v in node.value)
        active.discard(key)
        if n > MAX_YAML_NODES:
            raise SpecError((), f"expands to over {MAX_YAML_NODES} YAML nodes (nested aliases?); a spec needs a few hundred",
                            line=node.start_mark.line + 1)  # fmt: skip
        sizes[key] = n
        return n

    return size(root, 0)


def _parse_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    """Compose ``text`` with bounded depth, check its expanded size, then build Python objects."""
    loader = _BoundedLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        _expanded_size(root)
        return root, loader.construct_document(root)
    finally:
        loader.dispose()



def _lines(node: yaml.Node, path: tuple[str, ...], out: dict[tuple[str, ...], int]) -> None:
    """Record the 1-based line of every mapping key (and list item) under ``path``; reject duplicate keys."""
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for knode, vnode in node.value:
            key = str(knode.value)
            if key in seen:
                raise SpecError((*path, key), "duplicate key", line=knode.start_mark.line + 1)
            seen.add(key)
            out[(*path, key)] = knode.start_mark.line + 1
            _lines(vnode, (*path, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.setdefault((*path, str(i)), item.start_mark.line + 1)


def _line_of(lines: dict[tuple[str, ...], int], key: tuple[str, ...]) -> int | None:
    for n in range(len(key), -1, -1):
        if key[:n] in lines:
            return lines[key[:n]]
    return None


def parse_assignments(items: list[str] | None, what: str) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": 1, "c": "x"}``; values are YAML scalars or lists (``[10, 20]``)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} {item!r} is not KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ValueError(f"{what} {item!r}: the value is not a YAML value") from None
    return out


def load_spec(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> StudySpec:
    """Read and validate a spec file; errors are one-line ``ValueError``s naming the key and line.

    ``overrides`` (``--set``, see ``apply_overrides``) change the parsed spec before validation; the
    spec's text (stored with the study and its MLflow run) is then the resolved YAML.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study spec {str(path)!r} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save the spec as UTF-8") from None
    try:
        root, data = _parse_yaml(text)
    except SpecError as exc:
        at = f":{exc.line}" if exc.line else ""
        raise ValueError(f"{path}{at}: {exc.message}") from None
    except RecursionError:  # the node bound above should make this unreachable; never a traceback
        raise ValueError(f"{path}: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{path}{at}: invalid YAML (line {mark.line + 1 if mark else '?'}): {problem}") from None
    lines: dict[tuple[str, ...], int] = {}
    try:
        if root is not None:
            _lines(root, (), lines)
        if overrides:
            data = apply_overrides(data, overrides)
            text = yaml.safe_dump(data, sort_keys=False) + "# resolved with --set " + " ".join(f"{k}={v}" for k, v in overrides.items()) + "\n"
        return spec_from_mapping(data, name=path.stem, path=path, text=text)
    except SpecError as exc:
        line = exc.line or _line_of(lines, exc.key)
        at = f":{line}" if line else ""
        raise ValueError(f"{path}{at}: {'.'.join(exc.key) or 'spec'}: {exc.message}") from None
