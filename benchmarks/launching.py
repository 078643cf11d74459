"""Running benchmark jobs: one `deepspeed` subprocess per run, resumable, with peak memory.

Shared by `benchmarks/sample_efficiency.py` and `benchmarks/throughput.py`. A run is a
`RunSpec` (script, config, overrides, output dir). `execute` launches it unless its
`metrics.jsonl` is already complete for exactly the same command (then it is reused), writes
the launcher's output to `<out_dir>/launch.log`, and while it runs polls the peak resident
memory (`VmHWM` from /proc, the kernel's high-water mark) of each rank process. When the
job ends it removes the job's DeepSpeed shared-memory buffers from /dev/shm (the CPU backend
never unlinks them: ~66 MiB of RAM per rank per job otherwise stays taken).

A run that exits non-zero is `skipped` when the trainer reported a user error (a line
starting with `error: `: a config or prerequisite problem, e.g. an unknown credit scheme or a
missing verifier), otherwise `failed`; either way the reason is the trainer's error line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parent.parent
TRAIN_RL = "launch/train_rl.py"
TRAIN_PAV = "launch/train_pav.py"
SPEC_FILE = "benchmark_run.json"
"""Written into a run's output dir before launch: the exact command, to detect stale runs."""
LOG_FILE = "launch.log"
RESULT_FILE = "benchmark_result.json"
"""Written after a finished run: its wall time and peak memory, reported again when cached."""

RUN_DEFAULTS: tuple[str, ...] = (
    "logging.wandb=false",
    "logging.progress_bar=false",
    "trainer.save_final_model=false",
    "trainer.keep_checkpoints=1",
    "trainer.resume=auto",  # a killed benchmark resumes a run from its last checkpoint
)
"""Overrides every benchmark training run gets (before its own)."""

Status = Literal["done", "cached", "skipped", "failed"]

PEER_CRASH = r"Connection closed by peer|remote worker crash"
"""A rank's error that only reports another rank's death (not the cause)."""


@dataclass(frozen=True)
class RunSpec:
    """One training job."""

    name: str
    """Label in progress lines and tables."""
    out_dir: Path
    """The run's `output_dir` (metrics.jsonl, checkpoints, launch.log)."""
    overrides: tuple[str, ...]
    """Dotted config overrides (`output_dir` is added by `command`)."""
    max_steps: int
    """Expected final step; the run is complete when that step's eval row is logged."""
    config: str = "configs/quickstart.yaml"
    """YAML config, relative to the repository root."""
    script: str = TRAIN_RL
    """Entry point, relative to the repository root."""
    ranks: int = 2
    """`deepspeed --num_gpus` (ranks on this machine)."""
    group: str = ""
    """What the run belongs to (a method or configuration name)."""
    done_file: str | None = None
    """If set, the run is complete when this file exists in `out_dir` (e.g. the PAV
    verifier's metrics); else when metrics.jsonl holds the final eval row."""
    start_model: str = ""
    """The built-in start model the run starts from (`start_model_line`), part of what
    identifies its results: a rebuilt start model of the same recipe can be another policy,
    so a finished run from another copy is not reused. "" when not known or not built-in."""


@dataclass
class RunResult:
    """What happened to one `RunSpec`."""

    spec: RunSpec
    status: Status
    reason: str = ""
    """The trainer's error line for skipped / failed runs."""
    wall_s: float = 0.0
    """Launch to exit, seconds (a cached run: its original time, if recorded)."""
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    """Peak resident memory (VmHWM, MiB) over the whole run, per rank process (`rank0`, ...),
    plus `other` = the sum of the peaks of any further processes the ranks started."""

    @property
    def ok(self) -> bool:
        return self.status in ("done", "cached")


# ----------------------------------------------------------------------------------- metrics


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file ([] if it does not exist); a torn last line is ignored."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path` ({} if missing or unreadable)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def metrics_complete(rows: list[dict[str, Any]], max_steps: int) -> bool:
    """True when the rows hold the final step's row with its eval accuracy."""
    return any(r.get("step") == max_steps and "eval/accuracy" in r for r in rows)


def step_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Training-step rows (step >= 1 with timings), one per step (the last one wins)."""
    by_step = {int(r["step"]): r for r in rows if r.get("step", 0) >= 1 and "time/step_s" in r}
    return [by_step[s] for s in sorted(by_step)]


def error_line(log_text: str, limit: int = 300) -> str:
    """Why a run failed, from its log, at most `limit` characters: the trainer's own error
    line (`error: ...` or `error (rank N): ...`; one naming a crashed peer only if there is
    no other), else a rank killed by a signal, else the last Python exception line, else the
    last non-empty line."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^error( \(rank \d+\))?: ", ln)]
    primary = [ln for ln in errors if not re.search(PEER_CRASH, ln)]
    killed = re.search(r"exits with return code = (-\d+)", log_text)
    exceptions = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b.*: ", ln)]
    if primary or (errors and not killed):
        line = (primary or errors)[0]
    elif killed:
        code = int(killed.group(1))
        line = f"a rank was killed by signal {-code}" + (
            " (SIGKILL: out of memory?)" if code == -9 else ""
        )
    elif exceptions:
        line = exceptions[-1]
    else:
        line = lines[-1] if lines else "no output"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def classify_failure(log_text: str) -> Status:
    """`skipped` for a user error (config / missing prerequisite), `failed` otherwise."""
    return "skipped" if re.search(r"^error: ", log_text, re.MULTILINE) else "failed"


# ----------------------------------------------------------------------------------- launching


DS_RUNNER = "deepspeed.launcher.runner"
"""The module behind the `deepspeed` command."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def command(spec: RunSpec, port: int | None = None) -> list[str]:
    """The full launch command of `spec` (deepspeed launcher from this environment: its
    script beside the interpreter, else the launcher's module, as where packages were
    installed with `pip --target`)."""
    script = Path(sys.executable).parent / "deepspeed"
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", DS_RUNNER]
    cmd = [*launcher, "--num_gpus", str(spec.ranks)]
    if port is not None:
        cmd += ["--master_port", str(port)]
    overrides = [*spec.overrides, f"output_dir={spec.out_dir}"]
    return [*cmd, spec.script, "--config", spec.config, *overrides]


def spec_record(spec: RunSpec) -> dict[str, Any]:
    """What identifies a run's results: script, config, overrides and, when known, the start
    model's weights (not the port)."""
    record: dict[str, Any] = {
        "script": spec.script,
        "config": spec.config,
        "overrides": list(spec.overrides),
        "ranks": spec.ranks,
    }
    if spec.start_model:
        record["start_model"] = spec.start_model
    return record


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "disabled")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def is_complete(spec: RunSpec) -> bool:
    """The run's outputs are all there (see `RunSpec.done_file`)."""
    if spec.done_file is not None:
        return (spec.out_dir / spec.done_file).is_file()
    return metrics_complete(read_jsonl(spec.out_dir / "metrics.jsonl"), spec.max_steps)


def same_command(spec: RunSpec) -> bool:
    """The run dir's record describes the run of `spec` (see `same_run`)."""
    record = spec.out_dir / SPEC_FILE
    return record.is_file() and same_run(json.loads(record.read_text()), spec)


def same_run(stored: dict[str, Any], spec: RunSpec) -> bool:
    """`stored` (a `spec_record`) is the run of `spec`: the same script, ranks and start
    model, and the same config once resolved by today's code, so an equivalent spelling of
    the overrides (`algo.credit_kwargs={alpha: 2}` then, `algo.credit={name: pav, alpha: 2}`
    now) is the same run and is not run again."""
    current = spec_record(spec)
    if stored == current:
        return True
    if any(stored.get(key) != current.get(key) for key in ("script", "ranks", "start_model")):
        return False
    mine = resolved_config(current, spec.out_dir)
    return mine is not None and mine == resolved_config(stored, spec.out_dir)


def resolved_config(record: dict[str, Any], out_dir: Path) -> dict[str, Any] | None:
    """The config a `spec_record` runs with, as a plain dict (None if it no longer loads)."""
    from rl.config import load_config, to_dict
    from rl.core.errors import ConfigError

    overrides = [*record.get("overrides", []), f"output_dir={out_dir}"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # an old spelling, recorded
            return to_dict(load_config(REPO / record["config"], overrides))
    except (ConfigError, KeyError):
        return None


def is_cached(spec: RunSpec) -> bool:
    """The run finished before with the same command."""
    return same_command(spec) and is_complete(spec)


def prepare_dir(spec: RunSpec) -> None:
    """Keep a partial run of the same command (it resumes); wipe a run dir of another
    command. Refuses to wipe a non-empty directory that is not a benchmark run."""
    out = spec.out_dir
    if out.exists() and not same_command(spec):
        looks_like_run = any((out / name).exists() for name in (SPEC_FILE, LOG_FILE))
        if any(out.iterdir()) and not looks_like_run:
            raise FileExistsError(f"{out} exists and is not a benchmark run directory")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / SPEC_FILE).write_text(json.dumps(spec_record(spec), indent=2) + "\n")


def vm_hwm_mb(pid: int) -> float | None:
    """Peak resident set size of a live process in MiB (Linux `VmHWM`), None if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


class MemoryWatcher:
    """Polls the peak RSS of a launcher's descendants: rank processes are the ones whose
    command line has `--local_rank=N`; everything they start in turn counts as `other`."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self.rank_peaks: dict[int, float] = {}
        self.other_peaks: dict[int, float] = {}

    def poll(self) -> None:
        import psutil

        try:
            children = psutil.Process(self.root_pid).children(recursive=True)
        except psutil.Error:
            return
        rank_pids = set()
        for child in children:
            try:
                cmdline = " ".join(child.cmdline())
            except psutil.Error:
                continue
            match = re.search(r"--local_rank[= ](\d+)", cmdline)
            if match:
                rank_pids.add(child.pid)
                self._record(self.rank_peaks, int(match.group(1)), child.pid)
        for child in children:
            if child.pid in rank_pids:
                continue
            try:
                parents = {p.pid for p in child.parents()}
            except psutil.Error:
                continue
            if parents & rank_pids:
                self._record(self.other_peaks, child.pid, child.pid)

    @staticmethod
    def _record(peaks: dict[int, float], key: int, pid: int) -> None:
        value = vm_hwm_mb(pid)
        if value is not None:
            peaks[key] = max(peaks.get(key, 0.0), value)

    def peaks(self) -> dict[str, float]:
        out = {f"rank{r}": round(v, 1) for r, v in sorted(self.rank_peaks.items())}
        if self.other_peaks:
            out["other"] = round(sum(self.other_peaks.values()), 1)
        return out


SHM_DIR = Path("/dev/shm")


def release_shm(port: int) -> list[Path]:
    """Remove the shared-memory all-reduce buffers DeepSpeed's CPU backend created for the
    job on `port` and never unlinks (`deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`,
    ~66 MiB of RAM per rank each, left in /dev/shm after the job ends). Only this job's
    files: the name carries its master port. Returns the removed paths."""
    removed = []
    for path in SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def stop(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL the process group of a launcher this module started (its ranks included)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def execute(spec: RunSpec, poll_s: float = 0.5, timeout_s: float | None = None) -> RunResult:
    """Run `spec` unless cached; returns its result (never raises for a failed run)."""
    if is_cached(spec):
        saved = read_json(spec.out_dir / RESULT_FILE)
        return RunResult(
            spec, "cached", "", float(saved.get("wall_s", 0.0)), saved.get("peak_rss_mb", {})
        )
    prepare_dir(spec)
    log_path = spec.out_dir / LOG_FILE
    start = time.perf_counter()
    port = free_port()
    with open(log_path, "a") as log:
        log.write(f"# {' '.join(command(spec, port))}\n")
        log.flush()
        proc = subprocess.Popen(
            command(spec, port),
            cwd=REPO,
            env=run_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so a timeout can end the whole launcher tree
        )
        watcher = MemoryWatcher(proc.pid)
        try:
            while proc.poll() is None:
                watcher.poll()
                if timeout_s is not None and time.perf_counter() - start > timeout_s:
                    stop(proc)
                    reason = f"timed out after {timeout_s:.0f} s"
                    return RunResult(spec, "failed", reason, timeout_s, watcher.peaks())
                time.sleep(poll_s)
        except BaseException:  # Ctrl-C: the launcher runs in its own session, end it too
            stop(proc)
            raise
        finally:
            release_shm(port)
    wall = time.perf_counter() - start
    text = log_path.read_text()
    complete = is_complete(spec)
    if proc.returncode == 0 and complete:
        result = RunResult(spec, "done", "", wall, watcher.peaks())
        saved = {"wall_s": wall, "peak_rss_mb": result.peak_rss_mb}
        (spec.out_dir / RESULT_FILE).write_text(json.dumps(saved, indent=2) + "\n")
        return result
    if proc.returncode == 0:
        return RunResult(spec, "failed", "exited 0 but its outputs are incomplete", wall)
    return RunResult(spec, classify_failure(text), error_line(text), wall, watcher.peaks())


def run_all(
    specs: list[RunSpec],
    describe: Callable[[RunResult], str] | None = None,
    skip: Callable[[RunSpec, list[RunResult]], str | None] | None = None,
    desc: str = "runs",
) -> list[RunResult]:
    """Execute `specs` in order with a tqdm bar and one line per run.

    `skip(spec, earlier_results)` may return a reason not to launch a run (e.g. an earlier
    seed of the same method was skipped for a config error); `describe(result)` adds text to
    a finished run's line.
    """
    from tqdm import tqdm

    results: list[RunResult] = []
    bar = tqdm(total=len(specs), desc=desc, unit="run", dynamic_ncols=True)
    with bar:
        for i, spec in enumerate(specs, 1):
            reason = skip(spec, results) if skip is not None else None
            if reason is not None:
                result = RunResult(spec, "skipped", reason)
            else:
                bar.set_postfix_str(spec.name)
                result = execute(spec)
            results.append(result)
            line = f"[{i}/{len(specs)}] {spec.name}: {result.status}"
            if result.status == "done":
                line += f" in {result.wall_s:.1f} s"
            if result.reason:
                line += f" ({result.reason})"
            if describe is not None and result.ok:
                line += f" {describe(result)}"
            bar.write(line)
            bar.update(1)
    return results


# ----------------------------------------------------------------------------------- start model


def prebuild_start_model(config: str, overrides: list[str] | tuple[str, ...]) -> Path | None:
    """Find the shipped copy of this config's builtin start model, or build (or find) the
    cached one in this process, so no timed run includes the SFT build; returns its
    directory (None for a non-builtin model)."""
    from rl.config import load_config
    from rl.engine.models import BUILTIN_TINY, tiny_model_config
    from rl.engine.start_model import ensure_start_model

    cfg = load_config(REPO / config, list(overrides))
    if cfg.model.path != BUILTIN_TINY:
        return None
    cache = Path(cfg.model.cache_dir)
    if not cache.is_absolute():
        cache = REPO / cache
    return ensure_start_model(cache, tiny_model_config(cfg), source=cfg.model.builtin_source)


def start_model_line(path: Path | None) -> str:
    """`<cache name>, weights sha256 <digest>` of a built-in start model ("" for others): the
    cache name names the recipe; the digest tells two builds of it apart."""
    if path is None:
        return ""
    from rl.engine.start_model import weights_digest

    return f"{path.name}, weights sha256 {weights_digest(path)}"
