"""The documentation: its examples and the docstrings' examples run, it builds, it has the API."""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
import io
import pkgutil
import re
import zlib
from pathlib import Path

import pytest

import tdfusion

DOCS = Path(__file__).resolve().parents[1] / "docs"
SKIPPED_FOLDERS = {"_build", "_templates", "_ext", "_static", "generated"}
PAGES = sorted(
    page
    for page in DOCS.rglob("*.rst")
    if DOCS.is_dir() and not SKIPPED_FOLDERS.intersection(page.relative_to(DOCS).parts)
)
OPTION_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

#: A page that uses one of these names needs the optional package to run its examples.
OPTIONAL_PACKAGES = {
    "SegmentationTask": "segmentation_models_pytorch",
    "SegmentationScore": "segmentation_models_pytorch",
    "DetectionTask": "ultralytics",
    "DetectionScore": "ultralytics",
}


def page_id(page: Path) -> str:
    return page.relative_to(DOCS).as_posix()


def page_doctest(page: Path) -> doctest.DocTest:
    return doctest.DocTestParser().get_doctest(
        page.read_text(encoding="utf-8"), {}, page_id(page), str(page), 0
    )


PAGES_WITH_EXAMPLES = [page for page in PAGES if page_doctest(page).examples]


def test_the_docs_have_pages_with_examples():
    assert DOCS.joinpath("conf.py").is_file()
    assert len(PAGES_WITH_EXAMPLES) >= 5, [page_id(page) for page in PAGES_WITH_EXAMPLES]


@pytest.fixture
def one_torch_thread():
    """Run the examples on one thread: they are tiny, and on a busy machine with few cores
    torch's worker threads wait on each other far longer than they compute."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("page", PAGES_WITH_EXAMPLES, ids=page_id)
def test_page_examples_run(page, tmp_path, monkeypatch, one_torch_thread):
    test = page_doctest(page)
    code = "".join(example.source for example in test.examples)
    for name, package in OPTIONAL_PACKAGES.items():
        if name in code and importlib.util.find_spec(package) is None:
            pytest.skip(f"{page_id(page)} uses {name}, which needs {package}")
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # Examples may register networks: give them a copy of the registry, dropped afterwards.
    registry = importlib.import_module("tdfusion.nets.registry")
    monkeypatch.setattr(registry, "_MODEL_FACTORIES", dict(registry._MODEL_FACTORIES))
    runner = doctest.DocTestRunner(optionflags=OPTION_FLAGS)
    report = io.StringIO()
    result = runner.run(test, out=report.write, clear_globs=True)
    assert result.failed == 0, report.getvalue()
    assert result.attempted > 0


@pytest.mark.parametrize("page", PAGES_WITH_EXAMPLES, ids=page_id)
def test_skipped_examples_are_valid_python(page):
    """Examples marked ``+SKIP`` (they need a dataset or weights) still have to parse."""
    for example in page_doctest(page).examples:
        ast.parse(example.source, filename=f"{page_id(page)}:{example.lineno + 1}")


def modules_with_examples() -> list[str]:
    """Every module of the package with docstring examples, private modules included."""
    names = sorted(
        info.name
        for info in pkgutil.walk_packages(tdfusion.__path__, "tdfusion.")
        if not info.name.endswith("__main__")
    )
    with_examples = []
    for name in names:
        try:
            if docstring_tests(name):
                with_examples.append(name)
        except ImportError:  # collected anyway: its test then fails with the import error
            with_examples.append(name)
    return with_examples


def docstring_tests(module_name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(module_name)
    return [test for test in doctest.DocTestFinder().find(module, module_name) if test.examples]


#: Modules whose docstring examples are known to fail, with the reason; remove an entry when the
#: docstring is fixed (the test then passes and ``strict`` makes the stale entry fail).
KNOWN_DOCSTRING_FAILURES: dict[str, str] = {}


@pytest.mark.parametrize("module_name", modules_with_examples())
def test_docstring_examples_run(module_name, tmp_path, monkeypatch, one_torch_thread, request):
    if module_name in KNOWN_DOCSTRING_FAILURES:
        request.applymarker(
            pytest.mark.xfail(reason=KNOWN_DOCSTRING_FAILURES[module_name], strict=True)
        )
    tests = docstring_tests(module_name)
    monkeypatch.chdir(tmp_path)
    runner = doctest.DocTestRunner(optionflags=OPTION_FLAGS)
    report = io.StringIO()
    for test in tests:
        runner.run(test, out=report.write)
    failed = runner.summarize(verbose=False).failed
    if failed and "OptionalDependencyError" in report.getvalue():
        pytest.skip(f"{module_name}'s examples need an optional dependency")
    assert failed == 0, report.getvalue()


def public_modules() -> list[str]:
    """Every public package and module directly under ``tdfusion``."""
    return sorted(
        f"tdfusion.{info.name}"
        for info in pkgutil.iter_modules(tdfusion.__path__)
        if not info.name.startswith("_")
    )


def configured_api_packages() -> list[str]:
    source = DOCS.joinpath("conf.py").read_text(encoding="utf-8")
    match = re.search(r"^tdfusion_api_packages = (\[.*?\])", source, re.M | re.S)
    assert match, "docs/conf.py must define tdfusion_api_packages"
    return ast.literal_eval(match[1])


def test_every_public_package_has_an_api_page():
    assert set(public_modules()) <= set(configured_api_packages())


def inventory_names(path: Path) -> set[str]:
    """Object names in a Sphinx ``objects.inv`` (format 2: four header lines, then zlib)."""
    header_and_body = path.read_bytes().split(b"\n", 4)
    assert header_and_body[0] == b"# Sphinx inventory version 2"
    lines = zlib.decompress(header_and_body[4]).decode("utf-8").splitlines()
    return {line.split(" ", 1)[0] for line in lines if line}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::PendingDeprecationWarning")
def test_docs_build_without_warnings_and_list_every_public_object(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("furo")
    pytest.importorskip("myst_parser")
    pytest.importorskip("sphinxarg")
    from sphinx.cmd.build import build_main

    out = tmp_path / "html"
    log = tmp_path / "warnings.log"
    status = build_main(
        ["-W", "--keep-going", "-q", "-b", "html", "-w", str(log), str(DOCS), str(out)]
    )
    assert status == 0, log.read_text(encoding="utf-8")

    documented = inventory_names(out / "objects.inv")
    missing = []
    for package_name in configured_api_packages():
        try:
            package = importlib.import_module(package_name)
        except ModuleNotFoundError:
            continue  # a package that does not exist yet has no page
        for name in getattr(package, "__all__", []):
            if f"{package_name}.{name}" not in documented:
                missing.append(f"{package_name}.{name}")
    assert not missing, f"public objects without an API entry: {missing}"
    for name in tdfusion.__all__:
        assert f"tdfusion.{name}" in documented
    for core in ("tdfusion.trainer.MetaFusionTrainer", "tdfusion.nets.ReFusionNet"):
        assert out.joinpath("api", "generated", f"{core}.html").is_file()
