"""The documentation lives in the repository and stays complete:

- every public name (gdrd_fast.__all__ and the __all__ of each public module) has an entry in the API
  reference pages (docs/api/*.md), and the site builds with `mkdocs build --strict`;
- every Markdown document that code, comments or build files cite exists in the repository.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import zlib

import pytest

import gdrd_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_DIR = os.path.join(ROOT, "docs", "api")
DIRECTIVE = re.compile(r"^:::\s*([\w.]+)\s*$", re.MULTILINE)


def _optional_dependency_missing(exc: ImportError) -> bool:
    """The import failed on a third-party package that is not installed here (e.g. torchdistill, diffusers)."""
    while exc is not None:
        if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.split(".")[0] != "gdrd_fast":
            return True
        exc = exc.__cause__ if isinstance(exc.__cause__, ImportError) else None
    return False


def _resolve(path: str):
    """The object a mkdocstrings identifier names: the longest importable module prefix, then attributes;
    None where that module needs an optional package that is not installed here."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(name)
        except ImportError as exc:
            if isinstance(exc, ModuleNotFoundError) and exc.name == name:
                continue  # not a module: the rest is an attribute path
            if _optional_dependency_missing(exc):
                return None
            raise
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def _directives() -> list[str]:
    found = []
    for name in sorted(os.listdir(API_DIR)):
        if name.endswith(".md"):
            with open(os.path.join(API_DIR, name)) as f:
                found += DIRECTIVE.findall(f.read())
    return found


def _public_modules() -> list[str]:
    """gdrd_fast and every importable gdrd_fast module without a leading underscore in its path."""
    names = ["gdrd_fast"]
    for info in pkgutil.walk_packages(gdrd_fast.__path__, "gdrd_fast.", onerror=lambda name: None):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def _exported() -> list[tuple[str, str]]:
    """(module, name) for every name in the __all__ of a public module."""
    out = []
    for module_name in _public_modules():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # an optional third-party dependency is missing here
            if not _optional_dependency_missing(exc):
                raise
            continue
        out += [(module_name, name) for name in getattr(module, "__all__", ())]
    return out


def _is_submodule(module: str, name: str) -> bool:
    package = importlib.import_module(module)
    return hasattr(package, "__path__") and importlib.util.find_spec(f"{module}.{name}") is not None


def _uncovered(directives: list[str]) -> list[str]:
    """Exported names the directives do not render: neither an entry for the object itself, nor one for
    the exporting module (which renders its __all__, except names that are also submodules: mkdocstrings
    shows the submodule there, not the object)."""
    documented_ids = {id(obj) for obj in map(_resolve, directives) if obj is not None}
    missing = []
    for module, name in _exported():
        obj = getattr(importlib.import_module(module), name)
        by_module = module in directives and module != "gdrd_fast" and not _is_submodule(module, name)
        if id(obj) not in documented_ids and not by_module:
            missing.append(f"{module}.{name}")
    return missing


def test_api_pages_resolve_and_cover_every_public_name():
    directives = _directives()
    assert directives, f"no '::: identifier' entries in {API_DIR}"
    for path in directives:
        _resolve(path)  # a typo'd identifier fails here, with its name
    assert ("gdrd_fast", "crd_nce_loss") in _exported()
    missing = _uncovered(directives)
    assert not missing, ("public names without an entry in docs/api/*.md (add '::: <module>.<name>', with the "
                         "defining module's path where a submodule has the same name): " + ", ".join(missing))


def test_the_coverage_check_catches_a_missing_name():
    """Without its entry, a public name of gdrd_fast is reported; a name shadowed by a submodule is not
    covered by its package's page."""
    directives = _directives()
    assert "gdrd_fast.MemoryQueue" in _uncovered([d for d in directives if d != "gdrd_fast.MemoryQueue"])
    assert "gdrd_fast.data.degrade" in _uncovered([d for d in directives if d != "gdrd_fast.data.degrade.degrade"])


# --- citations of documents -------------------------------------------------------------------------
SOURCE_SUFFIXES = (".py", ".pyi", ".cpp", ".cc", ".cu", ".cuh", ".h", ".hpp", ".sh", ".yaml", ".yml", ".toml",
                   ".cfg", ".ini", ".txt")
SOURCE_NAMES = ("Makefile", "Dockerfile")
MD_TOKEN = re.compile(r"(?<![\w./-])([\w./-]*\w\.md)\b")
MD_LITERAL = re.compile(r"""["']([\w.-]+\.md)["']""")


def _tracked_files(root: str) -> list[str]:
    if shutil.which("git") and os.path.exists(os.path.join(root, ".git")):
        out = subprocess.run(["git", "ls-files"], check=False, cwd=root, capture_output=True, text=True)
        if out.returncode == 0:
            return out.stdout.splitlines()
    files = []  # not a git checkout (an sdist): every file except build outputs
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if (d == ".ci" or not d.startswith(".")) and d not in ("build", "dist", "site")
                   and d != "__pycache__" and not d.endswith(".egg-info")]
        files += [os.path.relpath(os.path.join(folder, n), root) for n in names]
    return files


def _is_source(path: str) -> bool:
    return path.endswith(SOURCE_SUFFIXES) or os.path.basename(path) in SOURCE_NAMES or path.startswith(".ci/")


# the page a reader of docs/design/adding-an-op.md is told to write
PLACEHOLDER_PAGES = {"docs/ops/my_loss.md"}


def missing_citations(root: str, files: list[str], markdown: bool = False) -> list[str]:
    """'path:line: cited' for every X.md that a source file among `files` (and, with markdown=True, a
    Markdown file: README, docs) cites and that is not among them.

    A cited path is looked up from the repository root and from the citing file's folder. A bare name
    that some Python file spells as a string literal ("results.md") is a file the code writes, not a
    citation.
    """
    existing = {os.path.normpath(p) for p in files}
    texts = {}
    for path in files:
        if (_is_source(path) or markdown and path.endswith(".md")) and os.path.isfile(os.path.join(root, path)):
            with open(os.path.join(root, path), encoding="utf-8", errors="replace") as f:
                texts[path] = f.read()
    outputs = {name for path, text in texts.items() if path.endswith(".py") for name in MD_LITERAL.findall(text)}
    bad = []
    for path, text in texts.items():
        here = os.path.dirname(path)
        for number, line in enumerate(text.splitlines(), 1):
            for cited in MD_TOKEN.findall(line):
                if "/" not in cited and cited in outputs or cited in PLACEHOLDER_PAGES:
                    continue
                if not {os.path.normpath(cited), os.path.normpath(os.path.join(here, cited))} & existing:
                    bad.append(f"{path}:{number}: {cited}")
    return bad


def test_code_cites_only_documents_in_the_repository():
    # this file cites made-up documents on purpose; mkdocs.yml's nav is checked by `mkdocs build --strict`
    files = [p for p in _tracked_files(ROOT) if p not in ("tests/test_docs.py", "mkdocs.yml")]
    bad = missing_citations(ROOT, files, markdown=True)
    assert not bad, ("citations of documents that are not in the repository (cite docs/<page>.md by its "
                     "path, or drop the citation):\n" + "\n".join(bad))


def test_the_citation_scan_catches_a_missing_document(tmp_path):
    """The scan itself, on a made-up tree: only the citation of a file that does not exist is reported."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# page\n")
    (tmp_path / "README.md").write_text("# readme\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        '"""Formulas: docs/page.md; usage: README.md; the old spec: specs/kernels.md section 2."""\n'
        'REPORT = "summary.md"  # written by this module\n'
        '# writes summary.md beside the JSON; see also ../docs/page.md and theory.md\n')
    (tmp_path / "build.sh").write_text("# follows docs/missing.md\n")
    files = ["docs/page.md", "README.md", "pkg/mod.py", "build.sh"]
    assert missing_citations(str(tmp_path), files) == [
        "pkg/mod.py:1: specs/kernels.md", "pkg/mod.py:3: theory.md", "build.sh:1: docs/missing.md"]
    # Markdown: a README that cites a spec section by its bare name; relative links resolve from the page
    (tmp_path / "README.md").write_text("# readme\nSplit as in paper_notes.md section 4; see [page](docs/page.md).\n")
    (tmp_path / "docs" / "page.md").write_text("# page\nBack to [readme](../README.md).\n")
    assert missing_citations(str(tmp_path), files, markdown=True)[:1] == ["README.md:2: paper_notes.md"]
    assert len(missing_citations(str(tmp_path), files, markdown=True)) == 4


# --- the site ---------------------------------------------------------------------------------------
def _inventory(site: str) -> set[str]:
    with open(os.path.join(site, "objects.inv"), "rb") as f:
        data = f.read()
    body = zlib.decompress(data.split(b"\n", 4)[4]).decode()
    return {line.split(" ", 1)[0] for line in body.splitlines() if line}


@pytest.mark.slow
def test_site_builds_strict_and_renders_every_api_entry(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    pytest.importorskip("material")
    site = str(tmp_path / "site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", site], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=600, check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    rendered = _inventory(site)
    directives = _directives()
    # a module page renders its members (its own heading is hidden), an object entry renders the object
    expected = {d for d in directives if not inspect.ismodule(_resolve(d))} | {f"{m}.{n}" for m, n in _exported()
                                  if m in directives and m != "gdrd_fast" and not _is_submodule(m, n)}
    missing = sorted(expected - rendered)
    assert not missing, "API entries missing from the built site: " + ", ".join(missing)


def test_make_docs_installs_the_docs_extra():
    """`make docs` installs its packages itself; they must be the `docs` extra of pyproject.toml."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["docs"]
    with open(os.path.join(ROOT, "Makefile")) as f:
        line = next(line for line in f if line.startswith("DOCS_DEPS :="))
    make_deps = [dep.strip('"') for dep in line.split(":=", 1)[1].split()]
    assert sorted(make_deps) == sorted(extra)
