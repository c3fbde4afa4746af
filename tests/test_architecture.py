"""The import boundaries and contracts of STYLE.md, checked by walking the code with `ast`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from mcpresd.core import errors
from mcpresd.protocol import Method
from mcpresd.rpc import ERROR_CODES, HANDLERS

ROOT = Path(__file__).resolve().parent.parent
PURE_STDLIB = {"__future__", "dataclasses", "enum", "typing", "math", "collections", "collections.abc",
               "functools", "itertools", "operator", "statistics", "heapq", "bisect", "re", "datetime", "fnmatch", "json"}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", modules("mcpresd/core"), ids=lambda p: p.name)
def test_the_core_imports_no_io(path: Path) -> None:
    for name in imports_of(path):
        assert name in PURE_STDLIB or name.startswith("mcpresd.core") or name == "mcpresd.protocol", (
            f"{path.name} imports {name}: the core must stay pure (no clock, sqlite, asyncio, os, psutil)")


@pytest.mark.parametrize("module, own", [("protocol.py", {"mcpresd", "mcpresd.protocol_enums"}),
                                         ("protocol_enums.py", {"mcpresd.protocol"})])
def test_the_protocol_is_standard_library_only(module: str, own: set[str]) -> None:
    for name in imports_of(ROOT / "mcpresd" / module):
        top = name.split(".")[0]
        assert top in sys.stdlib_module_names or name in own, f"{module} imports {name}"


def test_the_protocol_names_every_enum_it_loads_on_first_use() -> None:
    import enum

    from mcpresd import protocol, protocol_enums

    defined = {name for name, value in vars(protocol_enums).items()
               if isinstance(value, type) and issubclass(value, enum.Enum) and value.__module__ == protocol_enums.__name__}
    assert set(protocol.ENUMS) == defined
    assert all(getattr(protocol, name) is getattr(protocol_enums, name) for name in defined)


@pytest.mark.parametrize("path", modules("mcpctl"), ids=lambda p: str(p.relative_to(ROOT)))
def test_mcpctl_imports_only_the_protocol_from_the_daemon(path: Path) -> None:
    for name in imports_of(path):
        if name.startswith("mcpresd"):
            assert name == "mcpresd.protocol", f"{path.name} imports {name}"


def test_every_protocol_method_has_one_handler() -> None:
    assert set(HANDLERS) == set(Method)


def test_every_protocol_method_has_a_cli_caller() -> None:
    used: set[str] = set()
    for path in modules("mcpctl"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Method":
                used.add(node.attr)
    assert {m.name for m in Method} <= used, f"no mcpctl command calls {sorted({m.name for m in Method} - used)}"


def test_every_domain_error_has_an_error_code() -> None:
    def subclasses(cls: type) -> set[type]:
        found = set(cls.__subclasses__())
        return found.union(*(subclasses(c) for c in found)) if found else found

    domain = {c for c in subclasses(errors.DomainError) if c.__module__ == errors.__name__}
    assert domain and domain <= set(ERROR_CODES)
    for cls in domain:
        assert cls.__doc__, f"{cls.__name__} needs a one-line docstring"


def test_application_error_codes_stay_outside_the_reserved_range() -> None:
    for code in ERROR_CODES.values():
        assert not -32768 <= code <= -32000 or code in (-32602,)


def test_the_allocate_path_imports_neither_typer_rich_nor_sqlite_utils() -> None:
    probe = ("import sys, mcpctl.main, mcpctl.fast, mcpctl.actions, mcpctl.client; "
             "print(sorted(m for m in ('typer', 'click', 'rich', 'sqlite_utils', 'psutil') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
