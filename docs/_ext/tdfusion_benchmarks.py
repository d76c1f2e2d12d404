"""The ``tdfusion-benchmarks`` directive: what ``benchmarks/`` holds, read at build time.

For every script ``benchmarks/<name>.py`` (names starting with ``_`` are helpers) the directive
writes a section with the script's module docstring and the command that runs it. When
``benchmarks/RESULTS.md`` exists, its measured figures (and the machine they were measured on)
are included after the scripts; otherwise a note says that no results are recorded yet. Nothing
is copied by hand into the documentation, so the page follows the folder.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

RESULTS_FILE = "RESULTS.md"


def benchmark_scripts(folder: Path) -> list[tuple[str, str]]:
    """``(file name, module docstring)`` of each public benchmark script, sorted by name."""
    scripts = []
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        scripts.append((path.name, docstring))
    return scripts


class BenchmarksDirective(SphinxDirective):
    """Render the scripts and recorded results of the repository's ``benchmarks/`` folder."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        folder = Path(self.env.srcdir).parent / "benchmarks"
        lines: list[str] = []
        scripts = benchmark_scripts(folder) if folder.is_dir() else []
        for path in folder.glob("*.py") if folder.is_dir() else ():
            self.env.note_dependency(str(path))
        for name, docstring in scripts:
            title = f"``benchmarks/{name}``"
            lines += [title, "~" * len(title), "", *docstring.splitlines(), ""]
        if not scripts:
            lines += [".. note::", "", "   ``benchmarks/`` holds no benchmark script yet.", ""]
        results = folder / RESULTS_FILE
        lines += ["Recorded results", "~~~~~~~~~~~~~~~~", ""]
        if results.is_file():
            self.env.note_dependency(str(results))
            document_folder = Path(self.state.document.current_source).parent
            relative = os.path.relpath(results, document_folder)
            lines += [f".. include:: {relative}", "   :parser: myst_parser.sphinx_", ""]
        else:
            lines += [
                ".. admonition:: Placeholder: no measured figures yet",
                "   :class: warning",
                "",
                f"   ``benchmarks/{RESULTS_FILE}`` does not exist yet. When a benchmark is run for",
                "   the record, its figures go there together with the machine they were",
                "   measured on (CPU model and core count, GPU, memory, Python, PyTorch and",
                "   tdfusion versions), and they appear here. This page never shows numbers",
                "   that were not measured.",
                "",
            ]
        container = nodes.section()
        container.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source="benchmarks/"), container)
        return list(container.children)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("tdfusion-benchmarks", BenchmarksDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
