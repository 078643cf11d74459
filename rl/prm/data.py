"""Step-label datasets for discriminative PRMs: the example type and its files.

One `StepExample` is one solution with one binary label per step, in TRL's stepwise form:
`prompt` (the problem text), `completions` (the steps, as strings without their delimiter),
`labels` (one bool per step: is this step still right?). Optional fields: `answer` (the gold
answer), `label_values` (one float per step: a soft label, e.g. Monte-Carlo success shares),
`cost` (what the labels cost: `teacher_labels` bought from a teacher, judge or callable;
`mc_rollouts` continuations sampled), and any other columns (`extra`), kept as they are.

Files, read by `read_step_dataset(path, format=None)`:

- storage: a `.jsonl` file (one row per line), a `datasets` directory (`save_to_disk`), or a
  directory written by `launch/make_prm_data.py` (its `data.jsonl` or `data/`);
- row format: `stepwise` (TRL's `prompt`/`completions`/`labels`; PRM800K as trl-lib/prm800k
  ships it) or `math_shepherd` (peiyi9979/Math-Shepherd: `input` is the question followed by
  the steps, each ended by the tag ` ки`; `label` is the same text with every tag replaced by
  `+` or `-`). Chosen explicitly or detected from the first row's columns.

Math-Shepherd parse: the question is the text before the first `Step 1:` marker (the whole
first segment is a step when there is none), and each step's `Step k:` marker is dropped, as
the steps are read without their numbering in the stepwise form. The tags' positions are
taken from `input`, so a `+` or `-` inside a step's maths is never mistaken for a label.

Bad rows raise a one-line `ConfigError` naming the file, the row and the value, before any
model work: a missing column, an empty step list, `completions` and `labels` of different
lengths, a label that is not a boolean, a tagged row whose tag and label counts differ.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rl.core.errors import ConfigError
from rl.data.jsonl import jsonl_values

RowFormat = Literal["stepwise", "math_shepherd"]
ROW_FORMATS: tuple[str, ...] = ("stepwise", "math_shepherd")
FileFormat = Literal["jsonl", "datasets"]
FILE_FORMATS: tuple[str, ...] = ("jsonl", "datasets")

JSONL_NAME = "data.jsonl"
"""The dataset file inside a `launch/make_prm_data.py` output directory (jsonl format)."""
DATASETS_NAME = "data"
"""The `save_to_disk` directory inside such an output directory (datasets format)."""

SHEPHERD_TAG = "ки"
"""Math-Shepherd's step tag in `input` (preceded by a space in the published rows)."""
SHEPHERD_LABELS = {"+": True, "-": False}
"""What replaces the tag in Math-Shepherd's `label` text."""
_STEP_MARKER = re.compile(r"Step \d+:\s*")

COST_KEYS: tuple[str, ...] = ("teacher_labels", "mc_rollouts")
"""The label-cost counters every example carries."""

_KNOWN = ("prompt", "completions", "labels", "answer", "label_values", "cost")


@dataclass
class StepExample:
    """One solution with a label per step (one row of TRL's stepwise format)."""

    prompt: str
    """The problem text."""
    completions: list[str]
    """[H] the steps, H >= 1, each without its delimiter."""
    labels: list[bool]
    """[H] True while the solution is still right at that step."""
    answer: str | None = None
    """The gold answer, when known."""
    label_values: list[float] | None = None
    """[H] soft labels in [0, 1] (`mc_soft`: the share of continuations that succeeded)."""
    cost: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COST_KEYS, 0))
    """What this example's labels cost: `teacher_labels`, `mc_rollouts`."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Any other columns (e.g. `prompt_index`, `sample`, `outcome`), written as columns."""

    def to_row(self) -> dict[str, Any]:
        """The example as one flat row (extra columns beside the known ones)."""
        row: dict[str, Any] = {
            "prompt": self.prompt,
            "completions": list(self.completions),
            "labels": list(self.labels),
            "answer": self.answer,
            "label_values": None if self.label_values is None else list(self.label_values),
            "cost": dict(self.cost),
        }
        clash = set(row) & set(self.extra)
        if clash:
            raise ValueError(f"extra columns {sorted(clash)} clash with the example's own fields")
        return row | self.extra


def until_first_error(example: StepExample) -> StepExample:
    """`example` cut after its first wrong step ([H] -> [min(H, first wrong + 1)]), with its
    soft labels and teacher-label cost cut to match; unchanged when every step is right."""
    from dataclasses import replace

    keep = next((h + 1 for h, good in enumerate(example.labels) if not good), len(example.labels))
    if keep == len(example.labels):
        return example
    values = None if example.label_values is None else example.label_values[:keep]
    cost = dict(example.cost)
    if cost.get("teacher_labels"):
        cost["teacher_labels"] = min(cost["teacher_labels"], keep)
    return replace(
        example,
        completions=example.completions[:keep],
        labels=example.labels[:keep],
        label_values=values,
        cost=cost,
    )


def total_cost(examples: Iterable[StepExample]) -> dict[str, int]:
    """Sum of every example's label cost, per counter of `COST_KEYS`."""
    totals = dict.fromkeys(COST_KEYS, 0)
    for ex in examples:
        for key in COST_KEYS:
            totals[key] += int(ex.cost.get(key, 0))
    return totals


# ----------------------------------------------------------------------------------------------
# Row parsing and validation
# ----------------------------------------------------------------------------------------------


def detect_row_format(row: Mapping[str, Any], where: str) -> RowFormat:
    """`stepwise` when the row has `completions` and `labels`, `math_shepherd` when it has
    `input` and `label`; a ConfigError naming the row's columns otherwise."""
    if "completions" in row and "labels" in row:
        return "stepwise"
    if "input" in row and "label" in row:
        return "math_shepherd"
    raise ConfigError(
        f"{where}: cannot tell the step-label format from the columns {sorted(row)}: expected "
        "prompt/completions/labels (stepwise) or input/label (math_shepherd)"
    )


def _column(row: Mapping[str, Any], name: str, where: str) -> Any:
    if name not in row:
        raise ConfigError(f"{where}: missing column {name!r} (columns: {sorted(row)})")
    return row[name]


def _string_list(value: Any, name: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ConfigError(f"{where}: {name} must be a list of strings, got {_short(value)}")
    if not value:
        raise ConfigError(f"{where}: {name} is an empty step list")
    return list(value)


def _bool_list(value: Any, n: int, where: str) -> list[bool]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: labels must be a list of booleans, got {_short(value)}")
    for i, label in enumerate(value):
        if not isinstance(label, bool):
            raise ConfigError(
                f"{where}: labels[{i}] is {label!r} ({type(label).__name__}), not a boolean"
            )
    if len(value) != n:
        raise ConfigError(
            f"{where}: {n} completions but {len(value)} labels; they must have the same length"
        )
    return list(value)


def _float_list(value: Any, n: int, where: str) -> list[float] | None:
    if value is None:
        return None
    ok = isinstance(value, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in value
    )
    if not ok or len(value) != n:
        raise ConfigError(
            f"{where}: label_values must be {n} numbers in [0, 1] (one per step), got "
            f"{_short(value)}"
        )
    return [float(v) for v in value]


def _cost(value: Any, where: str) -> dict[str, int]:
    cost = dict.fromkeys(COST_KEYS, 0)
    if value is None:
        return cost
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: cost must be a mapping of counts, got {_short(value)}")
    for key, count in value.items():
        if count is None:
            continue  # a datasets struct column fills counters other rows lack with null
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ConfigError(f"{where}: cost[{key!r}] must be a count >= 0, got {count!r}")
        cost[key] = count
    return cost


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_stepwise(row: Mapping[str, Any], where: str) -> StepExample:
    """A `StepExample` from a stepwise row (`prompt`, `completions`, `labels`, optional
    `answer`, `label_values`, `cost`; other columns go to `extra`)."""
    prompt = _column(row, "prompt", where)
    if not isinstance(prompt, str):
        raise ConfigError(f"{where}: prompt must be a string, got {_short(prompt)}")
    steps = _string_list(_column(row, "completions", where), "completions", where)
    labels = _bool_list(_column(row, "labels", where), len(steps), where)
    answer = row.get("answer")
    return StepExample(
        prompt=prompt,
        completions=steps,
        labels=labels,
        answer=None if answer is None else str(answer),
        label_values=_float_list(row.get("label_values"), len(steps), where),
        cost=_cost(row.get("cost"), where),
        extra={k: v for k, v in row.items() if k not in _KNOWN},
    )


def split_shepherd_question(first: str) -> tuple[str, str]:
    """(question, first step) of the text before Math-Shepherd's first tag: split at the first
    `Step 1:` marker; with no marker, no question (the whole text is the step)."""
    at = first.find("Step 1:")
    if at < 0:
        return "", first
    return first[:at].strip(), first[at:]


def parse_math_shepherd(row: Mapping[str, Any], where: str) -> StepExample:
    """A `StepExample` from a Math-Shepherd row: `input` (question + steps, each followed by
    the tag ` ки`) and `label` (the same text, each tag replaced by `+` or `-`)."""
    text = _column(row, "input", where)
    labelled = _column(row, "label", where)
    if not isinstance(text, str) or not isinstance(labelled, str):
        raise ConfigError(f"{where}: input and label must be strings")
    pieces = text.split(SHEPHERD_TAG)  # [H + 1]: the text before each tag, then the tail
    if len(pieces) < 2:
        raise ConfigError(f"{where}: input has no step tag {SHEPHERD_TAG!r}: an empty step list")
    labels = shepherd_labels(pieces, labelled, where)
    question, first = split_shepherd_question(pieces[0])
    steps = [_STEP_MARKER.sub("", p, count=1).strip() for p in [first, *pieces[1:-1]]]
    return StepExample(
        prompt=question,
        completions=steps,
        labels=labels,
        extra={k: v for k, v in row.items() if k not in ("input", "label")},
    )


def shepherd_labels(pieces: Sequence[str], labelled: str, where: str) -> list[bool]:
    """The `+`/`-` that `labelled` holds where the input had its tags. `pieces`: the input
    split at the tags ([H + 1]). ConfigError when the label text does not hold exactly one
    label at each of the H tags (its tag and label counts differ)."""
    n_tags = len(pieces) - 1
    labels: list[bool] = []
    pos = 0
    for piece in pieces[:-1]:
        mark = labelled[pos + len(piece) : pos + len(piece) + 1]
        if labelled[pos : pos + len(piece)] != piece or mark not in SHEPHERD_LABELS:
            break
        labels.append(SHEPHERD_LABELS[mark])
        pos += len(piece) + 1
    if len(labels) != n_tags or labelled[pos:] != pieces[-1]:
        raise ConfigError(
            f"{where}: input has {n_tags} step tags {SHEPHERD_TAG!r} but label holds "
            f"{len(labels)} labels in their places (then {_short(labelled[pos:], 40)}): tag "
            "and label counts differ"
        )
    return labels


def parse_row(row: Any, where: str, format: RowFormat | None = None) -> StepExample:
    """A `StepExample` from one row in `format` (detected from the columns when None)."""
    if not isinstance(row, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {type(row).__name__}")
    fmt = format or detect_row_format(row, where)
    if fmt == "stepwise":
        return parse_stepwise(row, where)
    if fmt == "math_shepherd":
        return parse_math_shepherd(row, where)
    raise ConfigError(f"step-label format {fmt!r} is not one of {', '.join(ROW_FORMATS)}")


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def is_datasets_dir(path: Path) -> bool:
    """Whether `path` is a `Dataset.save_to_disk` directory."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def resolve_data_path(path: str | Path) -> Path:
    """The file or `datasets` directory that holds the rows at `path`: `path` itself, or the
    `data.jsonl` / `data/` of a `launch/make_prm_data.py` output directory."""
    path = Path(path).expanduser()
    if path.is_dir() and not is_datasets_dir(path):
        for inner in (path / JSONL_NAME, path / DATASETS_NAME):
            if inner.is_file() or (inner.is_dir() and is_datasets_dir(inner)):
                return inner
        raise ConfigError(
            f"{path}: a directory with neither a datasets save nor {JSONL_NAME} or "
            f"{DATASETS_NAME}/ inside"
        )
    if not path.exists():
        raise ConfigError(f"step-label data not found: {path}")
    return path


def raw_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(`"<file> line k"` or `"<dir> row i"`, row) of a JSONL file or a datasets directory."""
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        data = load_from_disk(str(path))
        if isinstance(data, DatasetDict):
            if len(data) != 1:
                raise ConfigError(
                    f"{path}: a DatasetDict with splits {sorted(data)}; pass one split's folder"
                )
            data = next(iter(data.values()))
        for i, row in enumerate(data):
            yield f"{path} row {i}", row
        return
    yield from jsonl_values(path)


def read_step_dataset(path: str | Path, format: RowFormat | None = None) -> list[StepExample]:
    """Every example of the step-label data at `path` (see the module docstring for the
    paths and formats accepted). `format`: `stepwise` or `math_shepherd`; None detects it
    from the first row's columns. A bad row is a one-line ConfigError naming file and row."""
    if format is not None and format not in ROW_FORMATS:
        raise ConfigError(f"step-label format {format!r} is not one of {', '.join(ROW_FORMATS)}")
    source = resolve_data_path(path)
    examples: list[StepExample] = []
    for where, row in raw_rows(source):
        if format is None and isinstance(row, Mapping):
            format = detect_row_format(row, where)
        examples.append(parse_row(row, where, format))
    if not examples:
        raise ConfigError(f"{source}: no step-label rows")
    return examples


def write_jsonl(examples: Iterable[StepExample], path: str | Path) -> Path:
    """Write the examples as JSON lines at `path` (replaced atomically); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_row(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def write_datasets(examples: Iterable[StepExample], path: str | Path) -> Path:
    """Write the examples as a `datasets` directory (`Dataset.save_to_disk`) at `path`."""
    from datasets import Dataset

    rows = [ex.to_row() for ex in examples]
    Dataset.from_list(rows).save_to_disk(str(path))
    return Path(path)


def write_step_dataset(
    examples: Sequence[StepExample], path: str | Path, file_format: FileFormat = "jsonl"
) -> Path:
    """Write the examples at `path` as a JSONL file or a `datasets` directory."""
    if file_format == "jsonl":
        return write_jsonl(examples, path)
    if file_format == "datasets":
        return write_datasets(examples, path)
    raise ConfigError(f"--format {file_format!r} is not one of {', '.join(FILE_FORMATS)}")
