"""Check that this machine rebuilds the recorded builtin start models, or ship a new one.

    python launch/start_models.py list                       # recorded recipes and digests
    python launch/start_models.py check [--name NAME ...]    # rebuild here, compare digests
    python launch/start_models.py ship --config configs/quickstart_chat.yaml [KEY=VALUE ...]
        [--about TEXT]

The quickstarts' and benchmark regimes' start models are shipped with the package
(`rl/engine/start_models/<kind>-<key>/`) with their weights digests recorded in
`rl/engine/start_models/digests.json`, because a build of one recipe on another CPU or
library version can give other weights, and a tiny model's SFT turns that into another
policy. `check` builds every recorded recipe (or the named ones) into a temporary cache with
`model.builtin_source=build` and prints, per recipe, whether the digest is the recorded one;
it exits 1 when one differs. `ship` builds a config's start model here (or takes the cached
build), copies it into the package and records its digest and recipe (config, overrides).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="recorded recipes and digests")
    check = sub.add_parser("check", help="rebuild recorded recipes here and compare digests")
    check.add_argument("--name", action="append", default=[], help="a recorded recipe name")
    ship = sub.add_parser("ship", help="build a config's start model and ship it")
    ship.add_argument("--config", required=True, help="a run config naming a builtin model")
    ship.add_argument("--about", default="", help="what the recipe is for (one line)")
    ship.add_argument("overrides", nargs="*", help="dotted config overrides (model.tiny.*)")
    return parser.parse_args(argv)


def recipe(config: str, overrides: list[str]) -> tuple[Any, str]:
    """(TinyModelConfig, kind) of the builtin model a run config (with overrides) uses."""
    from rl.config import load_config
    from rl.engine.models import BUILTIN_MODELS, tiny_model_config

    cfg = load_config(REPO / config, overrides)
    if cfg.model.path not in BUILTIN_MODELS:
        raise SystemExit(f"error: {config}: model.path {cfg.model.path!r} is not a builtin model")
    return tiny_model_config(cfg), cfg.model.path.removeprefix("builtin:")


def build(config: str, overrides: list[str], cache: Path) -> Path:
    """Build (or find in `cache`) the start model of `config` with `overrides`."""
    from rl.engine.start_model import ensure_start_model

    tiny, kind = recipe(config, overrides)
    return ensure_start_model(cache, tiny, kind=kind, source="build")


def list_recorded() -> int:
    from rl.engine.start_model import SHIPPED_ROOT, recorded_digests

    for name, entry in sorted(recorded_digests().items()):
        shipped = "shipped" if (SHIPPED_ROOT / name / "build_info.json").exists() else "recorded"
        print(f"{name}  {entry['weights_sha256']}  {shipped}  {entry.get('about', '')}")
    return 0


def check(names: list[str]) -> int:
    """Rebuild recorded recipes in a temporary cache; 1 if any digest differs."""
    from rl.engine.start_model import recorded_digests, weights_digest

    recorded = recorded_digests()
    unknown = sorted(set(names) - set(recorded))
    if unknown:
        raise SystemExit(f"error: no recorded start model {unknown[0]!r}; see `list`")
    failed = 0
    with tempfile.TemporaryDirectory(prefix="start-models-") as tmp:
        for name in names or sorted(recorded):
            entry = recorded[name]
            path = build(entry["config"], list(entry["overrides"]), Path(tmp))
            if path.name != name:
                raise SystemExit(f"error: {name}: its recipe now builds {path.name} (code changed)")
            digest = weights_digest(path)
            same = digest == entry["weights_sha256"]
            failed += not same
            want = entry["weights_sha256"]
            verdict = "reproduced" if same else f"DIFFERS from the recorded {want}"
            print(f"{name}: built here {digest}: {verdict}", flush=True)
    return 1 if failed else 0


def ship(config: str, overrides: list[str], about: str) -> int:
    """Build `config`'s start model in the default cache, copy it into the package, record
    its digest and recipe."""
    from rl.engine.start_model import DIGESTS_FILE, SHIPPED_ROOT, recorded_digests, weights_digest

    path = build(config, overrides, REPO / ".cache" / "start_models")
    target = SHIPPED_ROOT / path.name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(path, target)
    recorded = recorded_digests()
    recorded[path.name] = {
        "weights_sha256": weights_digest(target),
        "config": config,
        "overrides": overrides,
        "about": about,
    }
    DIGESTS_FILE.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")
    digest = recorded[path.name]["weights_sha256"]
    print(f"shipped {target.relative_to(REPO)}: weights digest {digest}")
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.action == "list":
        return list_recorded()
    if args.action == "check":
        return check(args.name)
    return ship(args.config, args.overrides, args.about)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
