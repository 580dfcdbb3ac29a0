"""Comments and docs cite only files that exist in the repository: a path such as
``shared/aio/chunks.py`` in a docstring, a comment or a Markdown page names a real file or
directory (generated output directories excepted)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "exit_server", "tunnel_client", "tests", "bench", "reliability", "scripts", "fuzz", "deploy")
DIRS = "|".join((*PACKAGES, "docs"))
SUFFIXES = {".py", ".sh", ".md", ".yml", ".yaml", ".toml", ".json", ".cfg"}
CITED = re.compile(rf"(?<![\w./-])((?:{DIRS})/[\w./-]*\w)")
GENERATED = ("bench/results", "fuzz/corpus", "__pycache__")


def sources() -> list[Path]:
    found = [ROOT / "README.md", ROOT / "Makefile"]
    for package in (*PACKAGES, "docs"):
        for path in (ROOT / package).rglob("*"):
            wanted = path.suffix in SUFFIXES or path.name == "Dockerfile"
            if path.is_file() and wanted and "results" not in path.parts:
                found.append(path)
    return found


def test_every_cited_path_exists() -> None:
    missing = []
    for path in sources():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for match in CITED.finditer(line):
                cited = match.group(1).rstrip(".").split("::")[0]
                if "*" in cited or "{" in cited or any(g in cited for g in GENERATED):
                    continue
                if not (ROOT / cited).exists():
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {cited}")
    assert not missing, "cited files that do not exist:\n" + "\n".join(missing)
