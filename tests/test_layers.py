"""Imports point one way: command line -> service and rotation -> policy, keys, stores, audit ->
envelope and AES-GCM -> errors and types.

Read from the source (every import outside an ``if TYPE_CHECKING:`` block, function bodies
included), so a module that reaches a layer above it fails here, not in a later refactor.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

import heimdall

PACKAGE = Path(heimdall.__file__).parent

# Lower numbers are lower layers. A module may import its own layer and those below.
LAYERS: dict[str, int] = {
    "heimdall.errors": 0,
    "heimdall.types": 0,
    "heimdall.secret": 1,
    "heimdall.aead": 1,
    "heimdall.normalize": 1,
    "heimdall.envelope": 2,
    "heimdall.private_files": 2,
    "heimdall.rbac": 2,
    "heimdall.kms": 3,
    "heimdall.store": 3,
    "heimdall.audit": 3,
    "heimdall.policy": 3,
    "heimdall.blind_index": 3,
    "heimdall.cipher": 4,
    "heimdall.modes": 4,
    "heimdall.metrics": 4,
    "heimdall.settings": 4,
    "heimdall.api.config": 4,  # the service's settings, read by heimdall.settings
    "heimdall.preflight": 3,  # the check framework the providers fill in
    "heimdall.service": 5,
    "heimdall.tokens": 5,  # service tokens, managed beside the service
    "heimdall.ingest": 5,
    "heimdall.rotation.lifecycle": 5,  # below the service, which offers its steps as methods
    "heimdall.rotation": 6,
    "heimdall.reencrypt": 6,
    "heimdall.app": 7,
    "heimdall.cli": 8,
    "heimdall.api": 8,  # the HTTP service, beside the command line
    "heimdall": 9,  # the package itself re-exports the public API
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    while module not in LAYERS:
        module = module.rpartition(".")[0]
        assert module, "every heimdall module must be in LAYERS"
    return LAYERS[module]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """The heimdall modules *tree* imports: for ``from a import b``, module ``a.b`` if there is
    one (``from heimdall import metrics``), else ``a``."""
    found: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                found |= _imports(ast.Module([child], []), modules)
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
        found |= _imports(node, modules)
    return found & modules


@cache
def graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = _imports(ast.parse(path.read_text(encoding="utf-8")), set(modules))
        edges[name] = imported - {name}
    return edges


def _reachable(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph()[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_every_module_imports_only_its_own_layer_and_those_below() -> None:
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in graph().items()
        for target in targets
        if _layer(target) > _layer(module)
    )
    assert upward == []


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("heimdall.settings", "heimdall.cipher"),  # the mode is a value, not the ciphers
        ("heimdall.kms.vault_transport", "heimdall.metrics"),  # calls reported through a seam
        ("heimdall.store.sqlite_schema", "heimdall.store.sqlite_jobs"),
        ("heimdall.store.postgres_schema", "heimdall.store.postgres_jobs"),
        ("heimdall.cli.migrate", "heimdall.cli.jobs"),
        ("heimdall.envelope", "heimdall.kms"),  # the format is pure
    ],
)
def test_a_module_does_not_reach_what_it_must_not_depend_on(module: str, forbidden: str) -> None:
    reached = _reachable(module)
    assert [t for t in reached if t == forbidden or t.startswith(forbidden + ".")] == []


def test_no_module_imports_itself_back_through_others() -> None:
    assert sorted(module for module in graph() if module in _reachable(module)) == []
