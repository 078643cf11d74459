"""benchmarks/RESULTS.md: a short summary with the headline tables, links that resolve, and
no "upper bound" in the table headers of it or of the study pages it links."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "RESULTS.md"
STUDY_PAGES = [
    REPO / "benchmarks" / "results" / name / "README.md"
    for name in (
        "sample_efficiency",
        "sample_efficiency_regimes",
        "search",
        "active_labels",
        "throughput",
        "gpu",
        "waste",
    )
] + [REPO / "benchmarks" / "results" / "memory.md"]
HEADLINE_HEADERS = (
    "| regime (steps) | outcome-only final | gold_steps (oracle-label reference): final, ratio "
    "| trained PAV: final, ratio | MC oracle (n_mc 4): final, ratio "
    "| learned PRM: final, ratio |",
    "| policy | majority vote | best-of-N, PAV | beam, PAV | beam, exact step labels |",
    "| labels bought | uniform | uncertainty (ActPRM) |",
    "| config | step time | note |",
    "| measurement | value |",
)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def summary_lines() -> list[str]:
    """The lines before the first `## ` heading."""
    lines = RESULTS.read_text().splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("## "))
    return lines[:end]


def header_lines(path: Path) -> list[str]:
    """Table header rows: each line followed by a `|---` separator row."""
    lines = path.read_text().splitlines()
    return [
        line
        for line, below in zip(lines, lines[1:], strict=False)
        if line.lstrip().startswith("|") and below.lstrip().startswith("|---")
    ]


def test_summary_is_short_and_holds_the_headline_tables() -> None:
    lines = summary_lines()
    assert len(lines) <= 60
    for header in HEADLINE_HEADERS:
        assert header in lines


def test_relative_links_resolve() -> None:
    for target in LINK.findall(RESULTS.read_text()):
        if "://" in target or target.startswith("#"):
            continue
        path = (RESULTS.parent / target.split("#")[0]).resolve()
        assert path.exists(), target


def test_no_upper_bound_in_table_headers() -> None:
    for path in [RESULTS, *STUDY_PAGES]:
        assert path.is_file(), path
        for line in header_lines(path):
            assert "upper bound" not in line.lower(), (path, line)
