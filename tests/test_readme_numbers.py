"""Every number in the README's tables (English and Chinese) comes from a committed results file.

A table cites its results: a `benchmarks/results/...` path in a row (that row's numbers are looked up there) or in
the paragraph just above the table (for the rows citing none). A number written with d decimals must equal, at d
decimals, a number in a cited file (git-tracked, JSON or markdown; a JSON and the markdown of the same stem count
as one result). Numbers inside `code` (paths, commands, labels) are not data.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULT = re.compile(r"benchmarks/results/[\w.\-]+\.(?:json|md)")
NUMBER = re.compile(r"(?<![\w.\-])-?\d+(?:\.\d+)?(?![\w])")
LEAD_LINES = 12          # how far above a table its citing paragraph may start


def _tracked() -> set[str]:
    out = subprocess.run(["git", "ls-files", "benchmarks/results"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def _numbers(text: str) -> list[float]:
    return [float(m) for m in re.findall(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", text)]


def _tables(lines: list[str]):
    """(first line index, rows, lead-in text) of each markdown table."""
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-| :]+\|$", lines[i + 1]):
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            yield i, lines[i + 2:j], "\n".join(lines[max(0, i - LEAD_LINES):i])
            i = j
        else:
            i += 1


def _cells_numbers(row: str) -> list[tuple[str, float, int]]:
    text = re.sub(r"`[^`]*`", " ", row)
    out = []
    for m in NUMBER.finditer(text):
        s = m.group(0)
        out.append((s, float(s), len(s.split(".")[1]) if "." in s else 0))
    return out


def _found(value: float, decimals: int, pool: list[float]) -> bool:
    tol = 0.5 * 10 ** -decimals + 1e-9
    return any(abs(v - value) <= tol for v in pool)


def _check(readme: Path) -> list[str]:
    tracked = _tracked()
    lines = readme.read_text(encoding="utf-8").splitlines()
    problems = []
    cache: dict[str, list[float]] = {}

    def pool(paths: list[str]) -> list[float]:
        vals = []
        # a results JSON and its rendered markdown table (same stem) are one result
        for p in dict.fromkeys(q for f in paths for q in (f, re.sub(r"\.(json|md)$", ".md", f),
                                                           re.sub(r"\.(json|md)$", ".json", f))):
            if p not in cache:
                cache[p] = _numbers((ROOT / p).read_text(encoding="utf-8")) if p in tracked else []
            vals += cache[p]
        return vals

    for start, rows, lead in _tables(lines):
        lead_files = RESULT.findall(lead)
        for k, row in enumerate(rows):
            files = RESULT.findall(row) or lead_files
            where = f"{readme.name}:{start + 3 + k}"
            if not files:
                problems.append(f"{where}: the table cites no benchmarks/results file")
                continue
            untracked = [f for f in files if f not in tracked]
            if untracked:
                problems.append(f"{where}: cites {untracked[0]}, which is not a committed results file")
                continue
            vals = pool(files)
            for s, v, d in _cells_numbers(row):
                if not _found(v, d, vals):
                    problems.append(f"{where}: {s} is in none of {', '.join(files)}")
    return problems


@pytest.mark.parametrize("name", ["README.md", "README.zh.md"])
def test_every_table_number_is_in_a_committed_results_file(name):
    problems = _check(ROOT / name)
    assert not problems, "\n".join(problems[:40])


def test_the_check_catches_a_number_that_is_not_there(tmp_path, monkeypatch):
    tracked = sorted(_tracked())
    cited = next(p for p in tracked if p.endswith(".md"))
    vals = _numbers((ROOT / cited).read_text(encoding="utf-8"))
    good = next(v for v in vals if v > 10)
    bad = 987654.321
    assert not _found(bad, 3, vals)
    readme = tmp_path / "README.md"
    readme.write_text(f"See `{cited}`:\n\n| a | b |\n|---|---|\n| x | {good:g} |\n| y | {bad} |\n| z | `{bad}` |\n",
                      encoding="utf-8")
    problems = _check(readme)
    assert len(problems) == 1 and "987654.321" in problems[0], problems
    readme.write_text("no citation\n\n| a |\n|---|\n| 1.5 |\n", encoding="utf-8")
    assert "cites no benchmarks/results file" in _check(readme)[0]


def _readme_tables():
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_tables_are_what_their_results_say():
    """The tables `benchmarks/readme_tables.py` makes are in both READMEs as it makes them (no hand edits), and a
    number changed by hand is caught."""
    rt = _readme_tables()
    for lang, path in rt.READMES.items():
        text = path.read_text()
        assert "<!-- table " in text, path.name
        assert rt.render(text, lang) == text, f"{path.name}: run python benchmarks/readme_tables.py"
        edited = text.replace("| 0.3667 |", "| 0.3666 |", 1)
        assert edited != text and rt.render(edited, lang) != edited
