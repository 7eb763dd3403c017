"""Bounded YAML loading for recipes, locks and profiles: files compactor did not write.

``yaml.safe_load`` runs no code, but it will still build whatever a file describes: an alias
bomb ("billion laughs") is a few hundred bytes that expand to 10^9 nodes once anything walks
them, and a 50 MB file takes minutes to parse. Here a file is refused before parsing when it
is too large, and after composing (which keeps aliases as shared nodes, so it is cheap) when
its tree, with every alias expanded, has too many nodes, nests too deeply, refers to itself,
or carries a tag other than YAML's plain ones (``!!python/object/apply`` and friends).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from compactor.errors import CompactorError, RecipeError

MAX_BYTES = 1 << 20  # 1 MiB: recipes and locks are a few KB
MAX_NODES = 100_000  # after alias expansion; a large recipe has a few thousand
MAX_DEPTH = 64

# The tags SafeLoader builds plain values for; any other tag is refused by name.
_PLAIN = "tag:yaml.org,2002:"
_SAFE_TAGS = {t for t in yaml.SafeLoader.yaml_constructors if t} | {_PLAIN + "merge"}


def read_yaml_text(
    path: Path, what: str, error: type[CompactorError] = RecipeError, max_bytes: int = MAX_BYTES
) -> str:
    """The text of ``path``, refused (before reading) when it is larger than ``max_bytes``."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}", "check the path") from e
    if size > max_bytes:
        raise error(
            f"{what} {path} is {size / 2**20:.1f} MiB, over the {max_bytes / 2**20:g} MiB "
            "limit for a YAML file compactor reads",
            "a recipe, lock or profile is a few KB; keep data and weights in their own files "
            "and point at them",
        )
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(max_bytes + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {what} {path}: {e}", "is it a UTF-8 text file?") from e


def compose_bounded(
    text: str,
    where: str,
    error: type[CompactorError] = RecipeError,
    max_nodes: int = MAX_NODES,
    max_depth: int = MAX_DEPTH,
) -> yaml.Node | None:
    """The YAML node tree of ``text``, checked against the limits (see the module doc).

    Malformed YAML raises ``error`` with ``where:line:col``."""
    if len(text) > MAX_BYTES:
        raise error(
            f"{where}: {len(text) / 2**20:.1f} MiB of YAML, over the "
            f"{MAX_BYTES / 2**20:g} MiB limit",
            "a recipe, lock or profile is a few KB; keep data and weights in their own files",
        )
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        pos = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(
            f"{where}{pos}: malformed YAML: {problem}",
            "check indentation and that each 'key: value' pair has a space after the colon",
        ) from e
    except RecursionError:
        raise error(
            f"{where}: YAML nested too deeply to read",
            f"a recipe nests a few levels; at most {max_depth} are read",
        ) from None
    if node is not None:
        _check_tree(node, where, error, max_nodes, max_depth)
    return node


def construct(node: yaml.Node | None, where: str, error: type[CompactorError] = RecipeError) -> Any:
    """Python values of a node tree from :func:`compose_bounded` (safe constructors only)."""
    if node is None:
        return None
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    except yaml.YAMLError as e:  # a value a safe constructor rejects (bad timestamp, base64)
        mark = getattr(e, "problem_mark", None)
        pos = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise error(
            f"{where}{pos}: malformed YAML: {getattr(e, 'problem', None) or e}",
            "check the value at that position",
        ) from e
    finally:
        loader.dispose()


def load_yaml(text: str, where: str, error: type[CompactorError] = RecipeError) -> Any:
    """``yaml.safe_load`` within the limits, with errors naming ``where``."""
    return construct(compose_bounded(text, where, error), where, error)


def load_yaml_file(path: Path, what: str, error: type[CompactorError] = RecipeError) -> Any:
    """Read and load a YAML file within the limits."""
    return load_yaml(read_yaml_text(path, what, error), str(path), error)


def _pos(node: yaml.Node) -> str:
    return f":{node.start_mark.line + 1}:{node.start_mark.column + 1}"


def _check_tree(
    root: yaml.Node, where: str, error: type[CompactorError], max_nodes: int, max_depth: int
) -> None:
    """Count nodes with every alias expanded (memoized by node, so a bomb costs as much as
    its text), refuse cycles, deep nesting and non-plain tags."""
    sizes: dict[int, int] = {}
    # Iterative post-order walk: (node, depth, children_done)
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    active: set[int] = set()
    while stack:
        node, depth, done = stack.pop()
        key = id(node)
        if done:
            active.discard(key)
            sizes[key] = _expanded_size(node, sizes, where, error, max_nodes)
            continue
        if key in sizes:
            continue
        if key in active:
            raise error(
                f"{where}{_pos(node)}: a YAML alias refers to the value that contains "
                "it (a recursive structure)",
                "remove the recursive alias",
            )
        _check_node(node, depth, where, error, max_depth)
        active.add(key)
        stack.append((node, depth, True))
        for child in _children(node):
            if id(child) not in sizes:
                stack.append((child, depth + 1, False))


def _expanded_size(node: yaml.Node, sizes: dict[int, int], where: str,
                   error: type[CompactorError], max_nodes: int) -> int:
    """Values under ``node`` with aliases expanded, from its children's sizes; refused past
    ``max_nodes``."""
    total = 1
    for child in _children(node):
        total += sizes[id(child)]
        if total > max_nodes:
            raise error(
                f"{where}{_pos(node)}: this YAML expands to more than {max_nodes:,} "
                "values (aliases repeat what they point at)",
                "a recipe has a few hundred values; remove the repeated aliases "
                "(a YAML alias bomb is refused, not expanded)",
            )
    return total


def _check_node(node: yaml.Node, depth: int, where: str, error: type[CompactorError],
                max_depth: int) -> None:
    """A plain tag (no tag that builds Python objects), no deeper than ``max_depth``."""
    if node.tag not in _SAFE_TAGS:
        raise error(
            f"{where}{_pos(node)}: unsupported YAML tag {node.tag.replace(_PLAIN, '!!')!r}",
            "compactor reads plain YAML only (mappings, lists, strings, numbers); remove "
            "the tag — YAML tags that build Python objects are never run",
        )
    if depth > max_depth:
        raise error(
            f"{where}{_pos(node)}: YAML nested more than {max_depth} levels deep",
            "a recipe nests a few levels; flatten the structure",
        )


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []
