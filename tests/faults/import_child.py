"""A site import in its own process, for the environment faults: killed with SIGKILL at a chosen step,
started together with another import, or measured.

    python -m tests.faults.import_child ROOT BUNDLE PUBKEY [--kill-at N] [--count] [--go FILE]

``--kill-at N`` sends SIGKILL to this process just before the N-th filesystem step of the import (an
os.replace/rename/fsync/makedirs/unlink/chmod/mkdir or shutil.rmtree call), so every point between two
steps can be tried; ``--count`` prints how many steps a whole import takes. ``--go FILE`` waits (at most
10 s) for FILE to exist, so two children start their imports at the same moment. Prints one JSON line:
{"ok", "error", "steps", "seconds"}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from typing import Any, Callable

from offline_delivery_core.bundle.format import BundleError
from offline_delivery_core.bundle.ed25519 import load_public_key_files
from offline_delivery_core.site.repo import RepoError, SiteRepo, import_bundle

STEPS = ("replace", "rename", "fsync", "makedirs", "unlink", "chmod", "mkdir")
_count = 0


def _counting(fn: Callable[..., Any], kill_at: int | None) -> Callable[..., Any]:
    def step(*args: Any, **kwargs: Any) -> Any:
        global _count
        _count += 1
        if kill_at is not None and _count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return step


def hook_steps(kill_at: int | None) -> None:
    """Count (and at ``kill_at``, die before) every filesystem step of what runs next in this process."""
    for name in STEPS:
        setattr(os, name, _counting(getattr(os, name), kill_at))
    shutil.rmtree = _counting(shutil.rmtree, kill_at)  # type: ignore[assignment]


def steps() -> int:
    return _count


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("bundle")
    ap.add_argument("pub")
    ap.add_argument("--kill-at", type=int)
    ap.add_argument("--count", action="store_true")
    ap.add_argument("--go")
    ap.add_argument("--lock-timeout", type=float, default=30)
    args = ap.parse_args()
    keys = load_public_key_files([args.pub])
    if args.go:
        deadline = time.monotonic() + 10
        while not os.path.exists(args.go) and time.monotonic() < deadline:
            time.sleep(0.005)
    if args.kill_at is not None or args.count:
        hook_steps(args.kill_at)
    started = time.monotonic()
    try:
        res = import_bundle(SiteRepo(args.root), args.bundle, keys, lock_timeout=args.lock_timeout)
        out = {"ok": True, "error": None, "changed": res.changed}
    except (BundleError, RepoError, OSError) as exc:
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    out.update(steps=_count, seconds=time.monotonic() - started)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
