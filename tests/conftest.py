from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A start-model cache holding the end-to-end tests' tiny SFT model, built once here in
    the test process so no launched job spends its time building it."""
    from rl.config import load_config
    from rl.engine.models import tiny_model_config
    from rl.engine.start_model import ensure_start_model
    from tests.launcher import FAST_OVERRIDES, REPO

    cache = tmp_path_factory.mktemp("start_models")
    cfg = load_config(REPO / "configs" / "quickstart.yaml", FAST_OVERRIDES)
    ensure_start_model(cache, tiny_model_config(cfg), show_progress=False)
    return cache


@pytest.fixture(scope="session")
def chat_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A start-model cache holding the chat end-to-end tests' builtin:chat-tiny."""
    from rl.config import load_config
    from rl.engine.models import tiny_model_config
    from rl.engine.start_model import CHAT_TINY, ensure_start_model
    from tests.launcher import CHAT_FAST_OVERRIDES, REPO

    cache = tmp_path_factory.mktemp("chat_models")
    cfg = load_config(REPO / "configs" / "quickstart_chat.yaml", CHAT_FAST_OVERRIDES)
    ensure_start_model(cache, tiny_model_config(cfg), show_progress=False, kind=CHAT_TINY)
    return cache
