"""Files named on a command line, read one way by both commands: a file that cannot be read or parsed is bad
input (a ``UsageError``, exit 2) whose message names it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .exits import UsageError


def read_yaml(path: Path, label: str | None = None, error: type[UsageError] = UsageError) -> Any:
    """The YAML document in ``path``; ``error`` (a UsageError) says "<label>: cannot read it" or "<label>: not
    valid YAML" otherwise (``label`` defaults to the path)."""
    label = label or str(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"{label}: cannot read it: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise error(f"{label}: not valid YAML: {exc}") from None
