"""Child process of the import benchmark: import one bundle into a site repository, print the result.

Runs the very code ``offline.delivery.bundle_import`` runs on a repo host (``site_repo.import_bundle``), in
its own process so its peak RSS can be read alone. Usage: ``python -m bench.import_child REPO BUNDLE PUB``.
"""

from __future__ import annotations

import json
import sys

from offline_delivery_core.bundle.ed25519 import load_public_key_pem
from offline_delivery_core.site.repo import SiteRepo, import_bundle


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        sys.stderr.write("usage: python -m bench.import_child REPO_ROOT BUNDLE PUBLIC_KEY\n")
        return 2
    repo_root, bundle, pub = argv
    with open(pub, encoding="ascii") as fh:
        keys = [load_public_key_pem(fh.read())]
    result = import_bundle(SiteRepo(repo_root), bundle, keys, imported_by="bench")
    sys.stdout.write(json.dumps(result.as_dict(), sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
