"""bundle-builder: build signed, content-addressed offline delivery bundles (the connected side)."""

import os
from pathlib import Path

# The builder version recorded in every manifest; one version with the collection (galaxy.yml).
__version__ = "0.2.0"


def cache_root() -> Path:
    """What the builder keeps across builds: ``${OD_CACHE:-/var/cache/offline-delivery-test}`` (``packages/``:
    the Debian package closures and files; ``sbom/``: layer scans)."""
    return Path(os.environ.get("OD_CACHE") or "/var/cache/offline-delivery-test")
