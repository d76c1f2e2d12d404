"""Sphinx configuration of the tdfusion documentation.

Build with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``. Everything is
built offline: no intersphinx inventories are fetched, and references to types of other
projects (torch, numpy, the standard library) are listed in ``nitpick_ignore_regex``. The code
examples of the pages and of the docstrings are run by ``tests/test_docs.py``.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))
if (ROOT / "tdfusion" / "__init__.py").is_file():
    # Build from the checkout even when tdfusion is installed elsewhere (or not at all).
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("MPLBACKEND", "Agg")

import tdfusion  # noqa: E402

# -- Project ------------------------------------------------------------------------------------
project = "tdfusion"
author = "tdfusion developers"
copyright = "tdfusion developers"
release = tdfusion.__version__
version = ".".join(release.split(".")[:2])

# -- Extensions ---------------------------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinxarg.ext",
    "myst_parser",
    "tdfusion_api",
    "tdfusion_xref",
    "tdfusion_benchmarks",
]
# MathJax from the package (no CDN), so that the equations render offline too.
if importlib.util.find_spec("sphinx-mathjax-offline") is not None:
    extensions.append("sphinx-mathjax-offline")

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**/*.inc"]
# Pages written at build time (see _ext/tdfusion_api.py); the list is the public API.
tdfusion_api_packages = [
    "tdfusion.losses",
    "tdfusion.nets",
    "tdfusion.trainer",
    "tdfusion.tasks",
    "tdfusion.data",
    "tdfusion.inference",
    "tdfusion.recipes",
    "tdfusion.recipe_tables",
    "tdfusion.recipe_checks",
    "tdfusion.recipe_runs",
    "tdfusion.demo",
    "tdfusion.benchmark",
    "tdfusion.metrics",
    "tdfusion.files",
    "tdfusion.devices",
    "tdfusion.allocator",
    "tdfusion.distributed",
    "tdfusion.errors",
    "tdfusion.cli",
]

# -- autodoc / autosummary / napoleon -----------------------------------------------------------
autosummary_generate = True
autosummary_generate_overwrite = True
autosummary_imported_members = True
autodoc_member_order = "bysource"
# Type hints in the signatures (one parameter a line when long) and, where a docstring does not
# give a parameter's or the return's type, in the description too.
autodoc_typehints = "both"
autodoc_typehints_description_target = "documented_params"
autodoc_typehints_format = "short"
# The loop and checkpoint functions annotate the trainer they take under TYPE_CHECKING.
autodoc_type_aliases = {"MetaFusionTrainer": "tdfusion.trainer.MetaFusionTrainer"}
python_maximum_signature_line_length = 88
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False

napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_ivar = True  # named-tuple fields are documented by autodoc already
napoleon_use_rtype = True
napoleon_preprocess_types = False
# "Shapes" (and its singular) lists tensor shapes, as kornia does; rendered as a titled block.
napoleon_custom_sections = ["Shapes", "Shape"]


def _skip_named_tuple_field_aliases(app, what, name, obj, skip, options):
    """Named-tuple fields are described in the class's Attributes; skip their stub entries."""
    doc = getattr(obj, "__doc__", None) or ""
    if what == "class" and doc.startswith("Alias for field number"):
        return True
    return None


def _drop_builtin_type_docstrings(app, what, name, obj, options, lines):
    """A constant without a doc comment would show ``str``'s or ``tuple``'s docstring."""
    if what not in ("data", "attribute") or not lines:
        return
    for source in (type(obj), getattr(obj, "__origin__", None)):  # a value, a typing alias
        type_doc = inspect.getdoc(source) if source is not None else None
        if type_doc and lines[0].strip() == type_doc.splitlines()[0].strip():
            lines.clear()
            return


def _dataclass_factory_defaults(app, what, name, obj, options, signature, return_annotation):
    """Dataclass fields with a ``default_factory`` show as ``= <factory>``, which is not Python:
    Sphinx then splits the signature at every comma. Show them as ``= ...`` instead."""
    if signature and "<factory>" in signature:
        return signature.replace("<factory>", "..."), return_annotation
    return None


def _public_bases(app, name, obj, options, bases):
    """A private base class has no page to link to: show its own bases in its place."""

    def public(base):
        if not base.__name__.startswith("_"):
            return [base]
        return [b for parent in base.__bases__ for b in public(parent)]

    bases[:] = [b for base in list(bases) for b in public(base)]


def setup(app):
    app.connect("autodoc-process-bases", _public_bases)
    app.connect("autodoc-process-signature", _dataclass_factory_defaults)
    app.connect("autodoc-skip-member", _skip_named_tuple_field_aliases)
    app.connect("autodoc-process-docstring", _drop_builtin_type_docstrings, priority=100)


# -- Cross-references ---------------------------------------------------------------------------
nitpicky = True
# Names of other projects cannot resolve without intersphinx (no network at build time).
_OTHER_PROJECTS = (
    "torch",
    "torchopt",
    "numpy",
    "np",
    "nn",
    "F",
    "scipy",
    "skimage",
    "PIL",
    "tqdm",
    "timm",
    "segmentation_models_pytorch",
    "smp",
    "ultralytics",
    "matplotlib",
    "collections",
    "os",
    "datetime",
    "pathlib",
    "argparse",
    "types",
    "typing",
    "logging",
    "contextlib",
    "numbers",
    "threading",
)
nitpick_ignore_regex = [
    (r"py:.*", rf"({'|'.join(_OTHER_PROJECTS)})\..+"),
    # Bare names of other projects' types, as annotations and docstrings spell them.
    (r"py:.*", r"(Tensor|Module|Path|PathLike|ArrayLike|ndarray|Generator|Optimizer|Dataset)"),
    (r"py:.*", r"(DataLoader|ArgumentParser|Namespace|GradientTransformation|LRScheduler)"),
    # numpy-docstring type words that are not classes: "callable", "sequence of str", "array-like",
    # value sets ``{"sgd", "adam"}``, dimension names in ``shape (H, W)``. No Python name holds a
    # space or a quote, so none of these can hide a broken reference to a real object.
    (r"py:class", r"[a-z][a-z_\- ]*"),
    (r"py:class", r".*[\s\"'{}].*"),
    (r"py:class", r"[A-Z]"),
    # Private type variables in generic signatures (``_NetT``, ``_FactoryT``).
    (r"py:class", r"tdfusion(\.\w+)*\._\w*T"),
]
nitpick_ignore: list[tuple[str, str]] = []

# -- HTML ---------------------------------------------------------------------------------------
html_theme = "furo"
html_static_path = ["_static"]
html_title = f"tdfusion {release}"
html_theme_options = {
    "navigation_with_keys": True,
}

# -- MyST (Markdown pages: the changelog) -------------------------------------------------------
myst_heading_anchors = 3
