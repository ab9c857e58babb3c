"""What the two commands share and neither owns: ``bundle-builder`` (bundle_builder/, the build host) and
``offline-delivery`` (offline_delivery_cli/, the site's controller) both import from here; nothing here imports
either of them (docs/architecture.md, "Decisions").

- ``exits``: the one exit-code contract (README.md, "Exit codes") and the ``main`` wrapper that keeps it.
- ``inputs``: files named on a command line (a YAML file that cannot be read or parsed is bad input, exit 2).
- ``fleet_table``: sites' signed status reports verified, and the fleet table (``bundle-builder fleet``, the
  ``offline-delivery rollout`` report).
"""
