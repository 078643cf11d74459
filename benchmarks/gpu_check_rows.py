"""What scripts/gpu_check.sh writes into benchmarks/results/gpu/summary.md, and how it checks
its kill-and-resume case.

    python -m benchmarks.gpu_check_rows merge SUMMARY ROWS
    python -m benchmarks.gpu_check_rows resume-gap FULL_RUN RESUMED_RUN STEP

`merge`: the summary keeps everything a person wrote in it; its case table (under `MARKER`)
gets one row per case, and a case run now replaces that case's earlier row while the cases
not run keep theirs (each row names the commit, date and GPUs it came from). Without the
marker, the table is appended.

`resume-gap`: the largest relative difference between two runs' metrics after `STEP` (all
keys but timings and memory), e.g. `max rel. diff 0 over 12 values`: an uninterrupted run
against one killed after `STEP` and resumed. On a GPU a difference is expected at the
level of non-deterministic kernels; a resume that lost state shows as a large one.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

MARKER = "<!-- gpu_check.sh case rows: a case run replaces its row, the others stay -->"
HEADER = (
    "| case | status | wall | last eval | run (commit, date, GPUs) |",
    "|---|---|---|---|---|",
)


def case_name(row: str) -> str:
    """The first cell of a markdown table row."""
    return row.strip().strip("|").split("|")[0].strip()


def merge_rows(summary: str, new_rows: list[str]) -> str:
    """`summary` with its case table holding `new_rows` and the earlier rows of the cases
    not in them (earlier rows first, in their order; then the new rows, in theirs)."""
    new_cases = {case_name(r) for r in new_rows}
    lines = summary.splitlines()
    if MARKER not in lines:
        head = [*lines, ""] if lines else []
        return "\n".join([*head, MARKER, "", *HEADER, *new_rows]) + "\n"
    at = lines.index(MARKER)
    table_end = at + 1
    while table_end < len(lines) and (
        not lines[table_end].strip() or lines[table_end].lstrip().startswith("|")
    ):
        table_end += 1
    old_rows = [r for r in lines[at + 1 : table_end] if r.lstrip().startswith("|")]
    kept = [r for r in old_rows[len(HEADER) :] if case_name(r) not in new_cases]
    rest = lines[table_end:]
    merged = [*lines[:at], MARKER, "", *HEADER, *kept, *new_rows]
    return "\n".join([*merged, *([""] + rest if rest else [])]) + "\n"


def compared(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row's numeric values that must replay: all but timings and memory."""
    skip = ("time/", "mem/")
    return {
        k: float(v)
        for k, v in row.items()
        if not k.startswith(skip) and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def resume_gap(full: Path, resumed: Path, after_step: int) -> str:
    """`max rel. diff X over N values` of the two runs' rows past `after_step`, or what
    does not line up (a missing step, other keys)."""
    from rl.trainer.metrics import read_metrics_file

    want = {r["step"]: compared(r) for r in read_metrics_file(full / "metrics.jsonl")}
    got = {r["step"]: compared(r) for r in read_metrics_file(resumed / "metrics.jsonl")}
    steps = sorted(s for s in want if s > after_step)
    if not steps or sorted(s for s in got if s > after_step) != steps:
        return f"steps differ: {sorted(got)} against {sorted(want)}"
    worst, count = 0.0, 0
    for step in steps:
        if want[step].keys() != got[step].keys():
            return f"step {step}: keys differ: {sorted(want[step].keys() ^ got[step].keys())}"
        for key, value in want[step].items():
            scale = max(abs(value), abs(got[step][key]), 1e-12)
            worst = max(worst, abs(value - got[step][key]) / scale)
            count += 1
    return f"max rel. diff {worst:.2g} over {count} values"


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "merge":
        summary, rows = Path(argv[1]), Path(argv[2])
        text = summary.read_text() if summary.is_file() else ""
        new_rows = [r for r in rows.read_text().splitlines() if r.strip()]
        summary.write_text(merge_rows(text, new_rows))
        return 0
    if len(argv) == 4 and argv[0] == "resume-gap":
        print(resume_gap(Path(argv[1]), Path(argv[2]), int(argv[3])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
