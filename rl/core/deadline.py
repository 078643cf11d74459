"""Calls with a deadline: user code (reward functions, reward heads) run in a worker thread
that the caller stops waiting for after `timeout_s`.

A Python thread cannot be killed: a call that never returns is left behind as a daemon
thread (it does not keep the process alive). The worker inherits the caller's autograd mode
and, on CUDA, its current device, which are per-thread state in torch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


class CallTimeout(Exception):
    """The call did not return within its deadline."""


def call_with_timeout(
    fn: Callable[..., T], timeout_s: float | None, *args: Any, **kwargs: Any
) -> T:
    """`fn(*args, **kwargs)`, raising CallTimeout when it takes longer than `timeout_s`
    seconds (None: called here, without a thread). The call's own exception is re-raised."""
    if timeout_s is None:
        return fn(*args, **kwargs)
    result: dict[str, Any] = {}
    grad = torch.is_grad_enabled()
    device = torch.cuda.current_device() if torch.cuda.is_initialized() else None

    def run() -> None:
        try:
            if device is not None:
                torch.cuda.set_device(device)
            with torch.set_grad_enabled(grad):
                result["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller
            result["error"] = e

    worker = threading.Thread(target=run, name=f"deadline:{getattr(fn, '__name__', 'call')}")
    worker.daemon = True
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise CallTimeout(f"no result after {timeout_s:g} s")
    if "error" in result:
        raise result["error"]
    value: T = result["value"]
    return value
