"""The import rules of docs/architecture.md, checked on the source with ``ast``.

Dependencies point one way: the outer layers (``training``, ``export``, ``serving``, ``ray``)
and the application entry points use the core, never the reverse. Every ``import`` statement
counts, including the ones inside functions (a lazy import is still a dependency), and a rule
holds for everything a module reaches through other modules of the package, so
``core → helper → serving`` breaks the rule as surely as ``core → serving``.

Nothing is imported or executed: the test parses the files, so a module with heavy or optional
dependencies (torch, ray, TorchServe) costs nothing and cannot hide behind an ImportError.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set

import pytest

PKG = "weclip_infer"
PKG_DIR = Path(__file__).resolve().parents[1] / PKG

#: Subpackages that form the outer layers.
OUTER = ("training", "export", "serving", "ray")
#: Application entry points: command lines that choose between layers by design (``quickstart``
#: builds a .mar and starts TorchServe; ``train`` is the ``python -m`` shim of the training CLI;
#: ``weclip-segment`` picks the local or the Ray engine). Besides these, every module named
#: ``cli``, ``*_cli`` or ``__main__`` is an application. Applications are outside the core.
APPS = ("quickstart", "train", "segment")
#: Leaf helpers every layer may use; they import only each other.
FOUNDATIONS = ("imageio", "io_utils", "labelmap", "palette", "normalization", "metrics", "memory", "threads",
               "tensor_ops", "device", "hardware", "packed_linear")
#: The model and what it is built from: they import only each other and the foundations.
MODEL_TIER = ("config", "backbone", "text", "classes", "cam", "decoder", "refine", "par", "losses", "model")
#: The one sanctioned crossing: the processor-aware fast path (``onnx_cache``) exports a
#: checkpoint to ONNX once, through the export layer, so that ``Segmenter.from_pretrained`` can run
#: any checkpoint on ONNX Runtime. It is a lazy import inside one function; nothing else of the
#: core reaches an outer layer (docs/architecture.md).
ALLOWED_EDGES = {(f"{PKG}.onnx_cache", f"{PKG}.export"), (f"{PKG}.onnx_cache", f"{PKG}.export.bundle_writer")}


# ---- the import graph ------------------------------------------------------------------------
def module_name(path: Path, pkg_dir: Path) -> str:
    parts = list(path.relative_to(pkg_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imported_names(tree: ast.AST, mod: str, is_pkg: bool, known: Set[str]) -> Set[str]:
    """Absolute names of the package's modules that ``tree`` imports (anywhere in the file)."""
    pkg_parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
    out: Set[str] = set()

    def add(name: str) -> None:
        # ``a.b.c`` names a module, or an attribute of one: keep the longest module prefix.
        parts = name.split(".")
        while parts and ".".join(parts) not in known:
            parts.pop()
        if parts:
            out.add(".".join(parts))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PKG or alias.name.startswith(PKG + "."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == PKG or target.startswith(PKG + "."):
                add(target)
                for alias in node.names:  # ``from pkg import submodule``
                    if f"{target}.{alias.name}" in known:
                        out.add(f"{target}.{alias.name}")
        elif isinstance(node, ast.Call):  # importlib.import_module("weclip_infer.x")
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith(PKG):
                    add(arg.value)
    return out


def import_graph(pkg_dir: Path) -> Dict[str, Set[str]]:
    """Module → the package modules it imports directly. Importing ``a.b.c`` also runs the
    ``__init__`` of ``a`` and ``a.b``, so those count as dependencies too."""
    files = {module_name(p, pkg_dir): p for p in sorted(pkg_dir.rglob("*.py"))}
    known = set(files)
    graph: Dict[str, Set[str]] = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        deps = _imported_names(tree, mod, _is_package(path), known)
        closed: Set[str] = set()
        for d in deps:
            parts = d.split(".")
            closed.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        closed.discard(mod)
        graph[mod] = {d for d in closed if d in known}
    return graph


def find_path(graph: Dict[str, Set[str]], start: str, bad) -> Optional[List[str]]:
    """Shortest import chain from ``start`` to a module for which ``bad(name)`` is true."""
    prev: Dict[str, Optional[str]] = {start: None}
    queue = [start]
    while queue:
        nxt = []
        for m in queue:
            for d in sorted(graph.get(m, ())):
                if d in prev:
                    continue
                prev[d] = m
                if bad(d):
                    chain = [d]
                    while prev[chain[-1]] is not None:
                        chain.append(prev[chain[-1]])
                    return chain[::-1]
                nxt.append(d)
        queue = nxt
    return None


def _in(name: str, subpackages: Iterable[str], pkg: str = PKG) -> bool:
    return any(name == f"{pkg}.{s}" or name.startswith(f"{pkg}.{s}.") for s in subpackages)


def is_app(name: str, pkg: str = PKG) -> bool:
    short = name[len(pkg) + 1:]
    last = short.rsplit(".", 1)[-1]
    return short in APPS or last in ("cli", "__main__") or last.endswith("_cli")


def is_core(name: str, pkg: str = PKG) -> bool:
    return name != pkg and not _in(name, OUTER, pkg) and not is_app(name, pkg)


def violations(graph: Dict[str, Set[str]], pkg: str = PKG) -> List[str]:
    """Every broken rule, one entry per import that crosses a boundary (empty when the tree
    follows the rules): ``rule: a.b → c.d (the import to remove); reached as: x → a.b → c.d; ...``."""

    def outer(n: str) -> bool:
        return _in(n, OUTER, pkg)

    def apps(n: str) -> bool:
        return is_app(n, pkg)

    found = {f"{pkg}.{m}" for m in FOUNDATIONS} | {pkg}
    tier = {f"{pkg}.{m}" for m in MODEL_TIER} | found
    grouped: Dict[tuple, List[str]] = {}

    def report(rule: str, chain: Optional[List[str]], allowed) -> None:
        """Group by the import that leaves what the rule allows (the one to remove)."""
        if chain:
            i = next(i for i in range(1, len(chain)) if not allowed(chain[i]))
            grouped.setdefault((rule, chain[i - 1], chain[i]), []).append(" → ".join(chain))

    for mod in sorted(graph):
        if is_core(mod, pkg):
            # the chain into an outer layer if there is one (it says why), else into an app
            report("core must not import training/export/serving/ray or an app",
                   find_path(graph, mod, outer) or find_path(graph, mod, apps), lambda n: is_core(n, pkg))
        if mod in found:
            report("foundations import only foundations (a new helper: add it to FOUNDATIONS here and in "
                   "docs/architecture.md)", find_path(graph, mod, lambda n: n not in found), found.__contains__)
        elif mod in tier:
            report("the model tier imports only itself and the foundations (a new helper: add it to FOUNDATIONS "
                   "here and in docs/architecture.md)", find_path(graph, mod, lambda n: n not in tier),
                   tier.__contains__)
        if _in(mod, ("serving", "ray"), pkg):
            report("serving must not import training", find_path(graph, mod, lambda n: _in(n, ("training",), pkg)),
                   lambda n: not _in(n, ("training",), pkg))
        if _in(mod, ("training",), pkg):
            report("training must not import serving/export",
                   find_path(graph, mod, lambda n: _in(n, ("serving", "export", "ray"), pkg)),
                   lambda n: not _in(n, ("serving", "export", "ray"), pkg))
    return [f"{rule}: {src} → {dst} (the import to remove); reached as: " + "; ".join(chains)
            for (rule, src, dst), chains in sorted(grouped.items())]


# ---- the rules on the real package ---------------------------------------------------------------
def without_allowed_edges(graph: Dict[str, Set[str]]) -> Dict[str, Set[str]]:
    return {m: {d for d in deps if (m, d) not in ALLOWED_EDGES} for m, deps in graph.items()}


def test_package_follows_the_import_rules():
    graph = import_graph(PKG_DIR)
    assert f"{PKG}.model" in graph and f"{PKG}.training.loop" in graph  # the scan found the package
    assert ALLOWED_EDGES & {(m, d) for m, deps in graph.items() for d in deps}, "stale ALLOWED_EDGES"
    found = violations(without_allowed_edges(graph))
    assert not found, "import rules of docs/architecture.md broken:\n- " + "\n- ".join(found)


def test_model_reaches_its_parts():
    """The graph is not trivially empty: the model's known dependencies are seen."""
    graph = import_graph(PKG_DIR)
    for part in ("backbone", "decoder", "cam", "refine", "par"):
        assert find_path(graph, f"{PKG}.model", lambda n, p=part: n == f"{PKG}.{p}"), part


# ---- the checker itself can fail -----------------------------------------------------------------
def _write(root: Path, files: Dict[str, str]) -> Path:
    pkg = root / PKG
    for rel, text in files.items():
        p = pkg / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return pkg


CLEAN = {
    "__init__.py": "",
    "model.py": "from .backbone import X\n",
    "backbone.py": "",
    "predictor.py": "from .model import WeCLIP\n",
    "helper.py": "",
    "imageio.py": "from . import io_utils\n",
    "io_utils.py": "",
    "serving/__init__.py": "",
    "serving/service.py": "from ..predictor import Segmenter\n",
    "training/__init__.py": "",
    "training/loop.py": "from weclip_infer.model import build_model\n",
}


def test_checker_accepts_a_clean_tree(tmp_path):
    assert violations(import_graph(_write(tmp_path, CLEAN))) == []


def test_applications_may_use_outer_layers(tmp_path):
    files = dict(CLEAN)
    files["batch/__init__.py"] = ""
    files["batch/cli.py"] = "def main():\n    from ..ray import engine\n"
    files["ray/__init__.py"] = ""
    files["ray/engine.py"] = "from ..predictor import Segmenter\n"
    assert violations(import_graph(_write(tmp_path, files))) == []
    files["helper.py"] = "from .batch.cli import main\n"  # but the core may not use an application
    found = violations(import_graph(_write(tmp_path, files)))
    assert any("weclip_infer.helper → weclip_infer.batch.cli (the import to remove)" in v for v in found), found


@pytest.mark.parametrize("rel, text, rule", [
    ("predictor.py", "def f():\n    from .training.loop import train\n", "core must not"),
    ("helper.py", "import weclip_infer.serving.service as s\n", "core must not"),
    ("helper.py", "import importlib\nm = importlib.import_module('weclip_infer.training.loop')\n", "core must not"),
    ("serving/service.py", "from weclip_infer.training import loop\n", "serving must not"),
    ("training/loop.py", "from ..serving import service\n", "training must not"),
    ("model.py", "from .predictor import Segmenter\n", "model tier"),
    ("imageio.py", "from .model import WeCLIP\n", "foundations import only"),
])
def test_checker_catches_a_broken_rule(tmp_path, rel, text, rule):
    files = dict(CLEAN)
    files[rel] = text
    found = violations(import_graph(_write(tmp_path, files)))
    assert any(rule in v for v in found), found


def test_checker_follows_chains(tmp_path):
    """``core → helper → serving`` is caught and the message names the whole chain."""
    files = dict(CLEAN)
    files["helper.py"] = "def f():\n    from .serving import service\n"
    files["backbone.py"] = ""
    files["predictor.py"] = "from .model import WeCLIP\nfrom .helper import f\n"
    found = violations(import_graph(_write(tmp_path, files)))
    assert any("weclip_infer.predictor → weclip_infer.helper → weclip_infer.serving" in v for v in found), found


def test_every_module_is_on_the_architecture_page():
    """The picture in docs/architecture.md names every module, so a new module gets a layer."""
    doc = (PKG_DIR.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    picture = doc.split("```", 2)[1]
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", picture))
    missing = sorted(m for m in import_graph(PKG_DIR)
                     if m != PKG and m.rsplit(".", 1)[-1] not in words | {"__main__"})
    assert not missing, f"modules missing from the picture in docs/architecture.md: {missing}"
