"""Write the API reference pages of tdfusion's public packages at build time.

For every package in ``tdfusion_api_packages`` (conf.py) one page is written to
``api/generated/<package>.rst``: the module docstring, then tables of the names in the package's
``__all__`` (classes, functions, exceptions) whose entries get their own stub pages from
autosummary, and the constants documented in place. Public submodules whose ``__all__`` holds
names the package does not re-export get a section of their own on the same page, so that
every public object is documented exactly once, under the name users import it by.

A package that cannot be imported because it does not exist (yet) is left out, and references
to it are not reported; any other import error fails the build.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.errors import ExtensionError
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging

logger = logging.getLogger(__name__)

GENERATED = Path("api") / "generated"


def import_package(name: str) -> ModuleType | None:
    """Import ``name``; ``None`` when that module (not one of its imports) does not exist."""
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name is not None and (name == error.name or name.startswith(error.name + ".")):
            return None
        raise ExtensionError(f"cannot import {name} for its API page: {error}") from error
    # A folder without __init__.py imports as an empty namespace package: not a package yet.
    return module if getattr(module, "__file__", None) else None


def public_names(module: ModuleType) -> list[str]:
    """The module's ``__all__``, or its public classes and functions defined there."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and getattr(value, "__module__", None) == module.__name__
    ]


def kind_of(value: Any) -> str:
    """Which table a public object goes to."""
    if inspect.isclass(value) and issubclass(value, BaseException):
        return "exceptions"
    if inspect.isclass(value):
        return "classes"
    if inspect.isroutine(value):
        return "functions"
    return "constants"


def attribute_comment(modules: list[ModuleType], name: str) -> list[str]:
    """The ``#:`` comment (or docstring after the assignment) of a module-level name."""
    for module in modules:
        try:
            docs = ModuleAnalyzer.for_module(module.__name__).find_attr_docs()
        except Exception:  # a module without source: nothing to read
            continue
        lines = docs.get(("", name))
        if lines:
            return [line for line in lines if line.strip() or line == ""]
    return []


def submodules(package: ModuleType) -> list[ModuleType]:
    """The public (not underscore-prefixed) submodules of a package, imported."""
    if not hasattr(package, "__path__"):
        return []
    found = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        module = import_package(f"{package.__name__}.{info.name}")
        if module is not None:
            found.append(module)
    return found


def section(module: ModuleType, names: list[str], defining: list[ModuleType]) -> list[str]:
    """The tables and constant entries for ``names`` of ``module``."""
    groups: dict[str, list[str]] = {
        "classes": [],
        "functions": [],
        "exceptions": [],
        "constants": [],
    }
    for name in names:
        groups[kind_of(getattr(module, name))].append(name)
    lines: list[str] = [f".. currentmodule:: {module.__name__}", ""]
    titles = {"classes": "Classes", "functions": "Functions", "exceptions": "Exceptions"}
    for kind, title in titles.items():
        if not groups[kind]:
            continue
        lines += [
            f".. rubric:: {title}",
            "",
            ".. autosummary::",
            "   :toctree: .",
            "   :nosignatures:",
            "",
        ]
        lines += [f"   {name}" for name in groups[kind]]
        lines.append("")
    if groups["constants"]:
        lines += [".. rubric:: Constants", ""]
        for name in groups["constants"]:
            lines += [f".. autodata:: {module.__name__}.{name}", ""]
            # autodoc reads the comment itself when the name is assigned in ``module``.
            comment = [] if attribute_comment([module], name) else attribute_comment(defining, name)
            lines += [f"   {line}" if line else "" for line in comment]
            lines.append("")
    return lines


def package_page(package: ModuleType) -> str:
    """The reST source of one package's API page."""
    name = package.__name__
    exported = public_names(package)
    exported_objects = {id(getattr(package, n)) for n in exported if hasattr(package, n)}
    children = submodules(package)
    lines = [
        name,
        "=" * len(name),
        "",
        f".. automodule:: {name}",
        "",
        *section(package, exported, children),
    ]
    for child in children:
        extra = [
            n
            for n in public_names(child)
            if n not in exported or id(getattr(child, n, None)) not in exported_objects
        ]
        if not extra:
            continue
        title = f"``{child.__name__}``"
        lines += [title, "-" * len(title), "", f".. automodule:: {child.__name__}", ""]
        lines += section(child, extra, [])
    return "\n".join(lines).rstrip() + "\n"


def write(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def generate(app: Sphinx, config: Config) -> None:
    """Write the package pages and the toctree of them, ``api/generated/packages.rst.inc``."""
    out = Path(app.srcdir) / GENERATED
    # Start from an empty folder: stub pages of objects that no longer exist must not linger.
    shutil.rmtree(out, ignore_errors=True)
    documented = []
    for name in config.tdfusion_api_packages:
        package = import_package(name)
        if package is None:
            logger.info("tdfusion_api: %s does not exist; no API page", name)
            # Docstrings that already name the package (its parent's overview) stay valid.
            config.nitpick_ignore = [*config.nitpick_ignore, ("py:mod", name)]
            continue
        write(out / f"{name}.rst", package_page(package))
        documented.append(name)
    toctree = [
        ".. toctree::",
        "   :maxdepth: 1",
        "",
        *(f"   generated/{name}" for name in documented),
    ]
    write(out / "packages.rst.inc", "\n".join(toctree) + "\n")


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("tdfusion_api_packages", [], "env", types=[list])
    # config-inited runs before the source files are discovered, so autosummary sees the pages.
    app.connect("config-inited", generate)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
