"""``python -m offline_delivery_cli``: the ``offline-delivery`` command without its console script."""

import sys

from .command import main

sys.exit(main())
