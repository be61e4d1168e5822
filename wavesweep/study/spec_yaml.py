"""A study spec's YAML: parsed with bounds (nesting depth, nodes after alias expansion) and
the line number of every key, so that a :class:`SpecError` at a key path becomes
``file:line: key: message`` (:func:`wavesweep.study.spec.load_spec`).
"""

from __future__ import annotations

from typing import Any

import yaml

from wavesweep.names import close_matches

# A small file must not be able to ask for gigabytes (nested aliases) or overflow the stack.
MAX_YAML_DEPTH = 50  # nesting of mappings and lists
MAX_YAML_NODES = 100_000  # nodes after alias expansion (a real spec has under 200)


class SpecError(ValueError):
    """A spec problem at ``key`` (a path of keys); the loader adds the file and line."""

    def __init__(self, key: tuple[str, ...], message: str, *, line: int | None = None) -> None:
        super().__init__(f"{'.'.join(key)}: {message}")
        self.key = key
        self.message = message
        self.line = line  # when the key path alone does not locate it (a duplicate key)


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


def parse_yaml(text: str) -> tuple[yaml.Node | None, Any]:
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


def key_lines(node: yaml.Node, path: tuple[str, ...], out: dict[tuple[str, ...], int]) -> None:
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
            key_lines(vnode, (*path, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.setdefault((*path, str(i)), item.start_mark.line + 1)


def line_of(lines: dict[tuple[str, ...], int], key: tuple[str, ...]) -> int | None:
    """The line of ``key``, else of its nearest recorded ancestor; a ``fixed`` key is also looked
    for under ``base`` (one section). None when no part of ``key`` is in the file (a default, a
    ``--set`` key): the document's first line would point at nothing."""
    keys = [key, ("base", *key[1:])] if key[:1] == ("fixed",) else [key]
    for n in range(len(key), 0, -1):
        for k in keys:
            if k[:n] in lines:
                return lines[k[:n]]
    return None if key else lines.get(())


def unknown_choice(what: str, value: object, valid: Any, listed_by: str | None = None) -> str:
    """``unknown WHAT VALUE``, with close matches (did you mean) or the valid names (more than 25
    with ``listed_by``, the function that lists them: their count and its name)."""
    valid = sorted(map(str, valid))
    close = close_matches(str(value), valid)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    shown = ", ".join(valid) if len(valid) <= 25 or not listed_by else f"{len(valid)} names (see {listed_by})"
    return f"unknown {what} {value!r}{hint}" if close else f"unknown {what} {value!r}; valid: {shown}"
