"""``offline-delivery``: the site-side command (docs/fleet.md, docs/multisite.md).

It runs the collection's playbooks through ansible-runner from the site's controller (the jump host) —
import, sync, install, upgrade, rollback, status, have, site_status — and rolls a release out across sites in
waves (``rollout``). It builds no bundle and imports nothing of the builder (bundle_builder/, the build host);
what it shares with ``bundle-builder`` (the exit-code contract, the fleet table) is in offline_delivery_common/.
"""
