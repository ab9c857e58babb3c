"""Names that become paths, unit names and keys on a host: application and component names, and release
versions. One rule for each, checked where the name enters (a signed manifest, a module argument, the model), so
a name like ``../../usr`` is refused before any path is made from it.
"""
from __future__ import annotations

import re

# \Z, not $: a $ would also match before a trailing newline ("shop\n").
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?\Z")
NAME_MAX = 40
# Semantic Versioning 2.0.0, the regular expression suggested by semver.org.
SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?\Z"
)
VERSION_MAX = 128
# Control characters: never in text that reaches a unit file, a label or a log line (a lone CR ends a line of
# a systemd unit).
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def name_problem(value: object, what: str = "name") -> str | None:
    """Why ``value`` is not a valid application or component name, or None."""
    if not isinstance(value, str):
        return f"{what} must be a string, got {type(value).__name__}"
    if len(value) > NAME_MAX or not NAME_RE.match(value):
        return (f"invalid {what} {value[:80]!r}: use lowercase letters, digits and '-', start and end with a "
                f"letter or digit, at most {NAME_MAX} characters")
    return None


def version_problem(value: object, what: str = "version") -> str | None:
    """Why ``value`` is not a valid release version (semver 2.0.0), or None."""
    if not isinstance(value, str):
        return f"{what} must be a string, got {type(value).__name__}"
    if len(value) > VERSION_MAX or not SEMVER_RE.match(value):
        return f"invalid {what} {value[:80]!r}: must be a semantic version such as 1.2.0 or 1.2.0-rc.1"
    return None
