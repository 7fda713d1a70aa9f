"""Reading YAML within bounds: config files, campaign files and model descriptions.

``yaml.safe_load`` constructs whatever the document says: a 1 KB "billion laughs" file of
nested aliases expands to gigabytes (an audit saw 3 GB and 49 s). :func:`read_yaml` reads at
most :data:`MAX_YAML_BYTES`, decodes UTF-8, and composes with :class:`BoundedLoader`, which
refuses, before anything is constructed, documents nested deeper than :data:`MAX_YAML_DEPTH`,
recursive aliases, and documents whose alias-expanded size (nodes + scalar characters) exceeds
:data:`MAX_YAML_EXPANDED`. Anchors and aliases within the bounds work. Every failure is one
:class:`YAMLReadError` line (the caller prefixes the file or key).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["MAX_YAML_BYTES", "MAX_YAML_DEPTH", "MAX_YAML_EXPANDED", "BoundedLoader", "YAML12Loader",
           "YAMLReadError", "load_bounded", "read_yaml", "yaml_problem"]

MAX_YAML_BYTES = 1 << 20  # a config or campaign file is a few KB
MAX_YAML_EXPANDED = 1 << 20  # nodes + scalar characters once every alias is expanded
MAX_YAML_DEPTH = 64  # nesting of sequences and mappings


class YAMLReadError(ValueError):
    """A YAML file that cannot be read within the bounds; ``str()`` is the one-line reason."""


class _BoundsError(yaml.YAMLError):
    """A document over one of the bounds (raised while composing)."""


class BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with the bounds of this module (checked while composing)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise _BoundsError(f"nested deeper than {MAX_YAML_DEPTH} levels at line {mark.line + 1}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> Any:
        node = super().compose_document()
        _check_expanded_size(node)
        return node


class YAML12Loader(BoundedLoader):
    """As :class:`BoundedLoader`, with YAML 1.2 numbers: ``1:30`` and ``02:00:00`` stay text
    (YAML 1.1 makes them the base-60 integers 90 and 7200; campaign files use this)."""


YAML12Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YAML12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"""^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$""", re.X),
    list("-+0123456789"))
YAML12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _check_expanded_size(root: Any) -> None:
    """Size of the node graph with every alias expanded (memoised: linear in the file), and no cycles."""
    if root is None:
        return
    size: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, closing = stack.pop()
        nid = id(node)
        if isinstance(node, yaml.ScalarNode):
            size[nid] = 1 + len(node.value)
            continue
        kids = [x for kv in node.value for x in kv] if isinstance(node, yaml.MappingNode) else node.value
        if closing:
            open_.discard(nid)
            size[nid] = 1 + sum(size[id(k)] for k in kids)
            if size[nid] > MAX_YAML_EXPANDED:
                raise _BoundsError(f"YAML aliases expand the document to more than {MAX_YAML_EXPANDED} "
                                   f"nodes and characters (at line {node.start_mark.line + 1}); "
                                   "write the values out, or use fewer aliases")
            continue
        if nid in size:
            continue
        if nid in open_:
            raise _BoundsError(f"recursive YAML alias at line {node.start_mark.line + 1}")
        open_.add(nid)
        stack.append((node, True))
        for k in kids:
            if id(k) in open_:
                raise _BoundsError(f"recursive YAML alias at line {k.start_mark.line + 1}")
            if id(k) not in size:
                stack.append((k, False))


def yaml_problem(e: yaml.YAMLError) -> str:
    """One line: the problem and where (line, column)."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        where = f" at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}" if e.problem_mark else ""
        msg = f"{e.problem}{where}" + (f" ({e.context})" if e.context else "")
    else:
        msg = str(e)
    msg = " ".join(msg.split())
    return msg if len(msg) <= 300 else msg[:300] + "..."


def load_bounded(text: str, base_60: bool = True) -> Any:
    """The one YAML document in ``text``, within the bounds (``base_60=False``: YAML 1.2 numbers)."""
    loader = None
    try:
        loader = (BoundedLoader if base_60 else YAML12Loader)(text)
        return loader.get_single_data()
    except _BoundsError as e:
        raise YAMLReadError(str(e)) from None
    except yaml.YAMLError as e:
        raise YAMLReadError(f"malformed YAML: {yaml_problem(e)}") from None
    except RecursionError:  # a bound above should have stopped it first
        raise YAMLReadError("YAML nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: str, base_60: bool = True) -> Any:
    """Read one YAML document from ``path``: at most :data:`MAX_YAML_BYTES`, UTF-8, bounded."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_YAML_BYTES + 1)
    except OSError as e:
        raise YAMLReadError(f"cannot read the file ({e.strerror})") from None
    if len(data) > MAX_YAML_BYTES:
        raise YAMLReadError(f"larger than {MAX_YAML_BYTES} bytes; a config or campaign file is a few KB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise YAMLReadError(f"not UTF-8 text (byte {e.start})") from None
    return load_bounded(text, base_60=base_60)
