"""Rules of the repository that reviews tend to miss: layering, no console output, lint and format."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "nodes"}


def _imports(package: str) -> list[tuple[Path, str, int]]:
    """(file, imported module, level) for every import in a package (level > 0 = relative)."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(path, alias.name, 0) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                found.append((path, node.module or "", node.level))
    return found


@pytest.mark.parametrize("package", ["flux2_core", "weight_streaming"])
def test_core_packages_never_import_comfyui_or_each_other(package):
    other = {"flux2_core": "weight_streaming", "weight_streaming": "flux2_core"}[package]
    bad = []
    for path, module, level in _imports(package):
        top = module.split(".")[0]
        depth = len(path.relative_to(ROOT / package).parts)  # 1 = directly in the package
        escapes = level > depth  # a relative import that climbs out of the package
        if (level == 0 and top in COMFY_MODULES | {other}) or escapes:
            bad.append(f"{path.relative_to(ROOT)}: {'.' * level}{module}")
    assert not bad, "imports that break the layering (nodes -> flux2_core, weight_streaming):\n" + "\n".join(
        bad
    )


def test_library_code_never_prints():
    bad = []
    for package in ("flux2_core", "weight_streaming", "nodes"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, "library code logs, never prints: " + ", ".join(bad)


def test_ruff_lint_and_format_clean():
    ruff = shutil.which("ruff")
    assert ruff, "ruff is a test dependency (.ci/requirements-dev.txt)"
    lint = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run(
        [ruff, "format", "--check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert fmt.returncode == 0, "run `ruff format .`:\n" + fmt.stdout + fmt.stderr


def test_no_citations_of_documents_outside_the_repository():
    """Readers of the pack cannot open the planning documents or the tracker: state facts instead."""
    import re

    pattern = re.compile(
        r"(flux2-spec|streaming|comfyui-integration|quantized-formats|lora-formats|users-and-ecosystem"
        r"|offline-assets|style-anchors)\.md|shared/docs|\bissues? #?\d+",
        re.IGNORECASE,
    )
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    bad = []
    for name in files.splitlines():
        path = ROOT / name
        if path == Path(__file__).resolve() or path.suffix not in {
            ".py",
            ".md",
            ".sh",
            ".toml",
            ".txt",
            ".json",
            "",
        }:
            continue
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        bad += [f"{name}:{i}" for i, line in enumerate(text.splitlines(), 1) if pattern.search(line)]
    assert not bad, "cite upstream sources or state the fact instead: " + ", ".join(bad)
