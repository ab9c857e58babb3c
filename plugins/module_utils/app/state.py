# Copyright: offline.delivery contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Per-host state of an application: what runs, what ran before, and the history of every change.

Layout under the host's state directory (``/var/lib/offline-delivery``, 0700 root)::

    fingerprint.key              0600  the host's key of the component fingerprints (``fingerprint_key``)
    apps/<app>/state.json        0600  current and previous release, kept release models, history
    apps/<app>/env/<comp>.env    0600  the component's resolved env (written by the runtimes)
    apps/<app>/snapshots/<version>/<volume>.tar   0600  data snapshots taken before an upgrade

``state.json`` is replaced atomically (write, fsync, rename), so a kill at any point leaves the old or the
new state, never half of one. Standard library only.
"""

from __future__ import annotations

import binascii
import copy
import json
import os
import shutil
import tarfile
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Set

from ..common.files import ensure_private_dir, write_private
from ..common.locks import flock_within
from ..common.names import name_problem, version_problem

SCHEMA = 1
HISTORY_MAX = 100
KEPT_RELEASES = 5
FINGERPRINT_KEY_FILE = "fingerprint.key"
FINGERPRINT_KEY_BYTES = 32


class StateError(RuntimeError):
    """The state cannot be read or written; the message names the file and what to do."""


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def app_dir(state_dir: str, app: str) -> str:
    """``<state_dir>/apps/<app>``, for a valid app name only (the name may come from a survey field)."""
    problem = name_problem(app, "app name")
    if problem:
        raise StateError(problem)
    return os.path.join(state_dir, "apps", app)


def fingerprint_key(state_dir: str, *, create: bool = True) -> bytes:
    """The key of this host's component fingerprints (HMAC-SHA256, ``app_runtime.fingerprint``): 32 random
    bytes in ``<state_dir>/fingerprint.key`` (0600, hex), made once and read ever after.

    A fingerprint is written where others can read it (unit files, container labels, k8s annotations, module
    results); keyed, it still tells "same spec" from "changed" on this host, but reveals nothing that can be
    guessed offline from the env values and secrets it covers. Without the file and with ``create`` False (check
    mode), a key of this run only: nothing is written, and every component shows as changed, as it will be
    on the first real deploy with a new key.
    """
    path = os.path.join(state_dir, FINGERPRINT_KEY_FILE)
    try:
        return _read_fingerprint_key(path)
    except FileNotFoundError:
        if not create:
            return os.urandom(FINGERPRINT_KEY_BYTES)
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        # Made complete under a name of its own (O_EXCL, 0600 from the start), then linked into place: a
        # concurrent deploy of another app either makes it first (then its key is used) or finds it whole.
        tmp = os.path.join(state_dir, ".%s.%s.tmp" % (FINGERPRINT_KEY_FILE, binascii.hexlify(os.urandom(8)).decode()))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, binascii.hexlify(os.urandom(FINGERPRINT_KEY_BYTES)) + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    except OSError as exc:
        raise StateError("cannot make the fingerprint key %s: %s; the state directory must be writable by the "
                         "user the deploy runs as" % (path, exc.strerror or exc)) from None
    return _read_fingerprint_key(path)


def _read_fingerprint_key(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_mode & 0o077:
                os.fchmod(fh.fileno(), 0o600)
            raw = fh.read(4 * FINGERPRINT_KEY_BYTES).strip()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StateError("cannot read the fingerprint key %s: %s" % (path, exc.strerror or exc)) from None
    try:
        key = binascii.unhexlify(raw)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != FINGERPRINT_KEY_BYTES:
        raise StateError("%s is not a fingerprint key (%d hex digits): move it away; the next deploy makes a new "
                         "one, and every component of every app on this host restarts once"
                         % (path, 2 * FINGERPRINT_KEY_BYTES))
    return key


class AppState:
    """The state file of one app on one host."""

    def __init__(self, state_dir: str, app: str) -> None:
        self.app = app
        self.state_dir = state_dir
        self.dir = app_dir(state_dir, app)
        self.path = os.path.join(self.dir, "state.json")
        self.data = self._load()

    def _load(self) -> Dict[str, Any]:
        try:
            with open(self.path, "rb") as fh:
                data = json.loads(fh.read().decode("utf-8"))
        except FileNotFoundError:
            return {"schemaVersion": SCHEMA, "app": self.app, "target": None, "current": None,
                    "previous": None, "releases": {}, "history": []}
        except (OSError, ValueError) as exc:
            raise StateError("%s cannot be read (%s): restore it from a backup, or move it away to make this "
                             "host forget the app (its data stays in place)" % (self.path, exc)) from None
        if not isinstance(data, dict) or data.get("schemaVersion") != SCHEMA or data.get("app") != self.app:
            raise StateError("%s is not a state file of schema %d for app %s" % (self.path, SCHEMA, self.app))
        return data

    # -- reading -----------------------------------------------------------------------------------

    @property
    def current(self) -> Optional[Dict[str, Any]]:
        return self.data["current"]

    @property
    def previous(self) -> Optional[Dict[str, Any]]:
        return self.data["previous"]

    def release(self, version: str) -> Optional[Dict[str, Any]]:
        """A release this host ran: its model, images, placement and addresses, kept for rollback."""
        return self.data["releases"].get(version)

    def kept_versions(self) -> List[str]:
        return sorted(self.data["releases"])

    def kept_images(self) -> Set[str]:
        """The image manifest digests (every platform) of the releases this host keeps for rollback."""
        return {digest for release in self.data["releases"].values()
                for image in (release.get("images") or {}).values()
                for digest in (image.get("manifests") or {}).values()}

    # -- writing -----------------------------------------------------------------------------------

    def record(self, *, version: str, model: dict, images: Mapping[str, Any], overrides: Mapping[str, Any],
               placement: Mapping[str, Any], addresses: Mapping[str, str], fingerprints: Mapping[str, str],
               target: str, by: str, at: str, modules: Optional[Mapping[str, bool]] = None) -> None:
        """Make ``version`` current; the one before becomes previous (unless it is the same version).
        ``modules`` are the site's module choices (module -> on), kept for the next deploy and rollback."""
        before = self.data["current"]
        entry = {"version": version, "installed_at": at, "by": by, "overrides": copy.deepcopy(dict(overrides)),
                 "fingerprints": dict(fingerprints)}
        if modules:
            entry["modules"] = dict(modules)
        if before and before["version"] != version:
            self.data["previous"] = before
        elif before:
            entry["installed_at"] = before["installed_at"]  # a re-run is not a new installation
            entry["by"] = before["by"]
        self.data["current"] = entry
        self.data["target"] = target
        self.data["releases"][version] = {"model": model, "images": dict(images), "placement": dict(placement),
                                          "addresses": dict(addresses)}
        self._trim_releases()

    def forget(self) -> None:
        """After an uninstall: nothing runs; history and kept releases stay for the record."""
        if self.data["current"]:
            self.data["previous"] = self.data["current"]
        self.data["current"] = None

    def add_history(self, event: Dict[str, Any]) -> None:
        self.data["history"].append(event)
        del self.data["history"][:-HISTORY_MAX]

    def _trim_releases(self) -> None:
        keep = {r["version"] for r in (self.data["current"], self.data["previous"]) if r}
        by_age = sorted(self.data["releases"], key=self._last_seen)
        for version in by_age:
            if len(self.data["releases"]) <= KEPT_RELEASES:
                break
            if version not in keep:
                del self.data["releases"][version]

    def _last_seen(self, version: str) -> str:
        times = [e.get("at", "") for e in self.data["history"] if version in (e.get("to"), e.get("from"))]
        return max(times) if times else ""

    def save(self) -> bool:
        raw = json.dumps(self.data, sort_keys=True, indent=1, ensure_ascii=False).encode("utf-8") + b"\n"
        return write_private(self.path, raw)


@contextmanager
def app_lock(state_dir: str, app: str, host: str, timeout: float) -> Iterator[None]:
    """One change of an app at a time on a host: an flock on its state directory (held by the running module,
    dropped when it exits, also when it is killed). Waits at most ``timeout`` seconds for another deploy."""
    directory = app_dir(state_dir, app)
    ensure_private_dir(directory)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if not flock_within(fd, timeout):
            raise StateError("another deploy, rollback or uninstall of %s is running on %s and did not "
                             "finish within %.0f s (e.g. one left running by a controller that was "
                             "stopped); wait for it to end, then run again" % (app, host, timeout))
        yield
    finally:
        os.close(fd)


# -- data snapshots -----------------------------------------------------------------------------------


def snapshot_dir(state_dir: str, app: str, version: str) -> str:
    problem = version_problem(version, "snapshot version")
    if problem:
        raise StateError(problem)
    return os.path.join(app_dir(state_dir, app), "snapshots", version)


def take_snapshot(state_dir: str, app: str, version: str, volume_dirs: Mapping[str, str]) -> Dict[str, int]:
    """Tar each volume directory (numeric owners, modes kept) into the version's snapshot; name -> bytes."""
    target = snapshot_dir(state_dir, app, version)
    ensure_private_dir(target)
    sizes = {}
    for name, directory in sorted(volume_dirs.items()):
        final = os.path.join(target, name + ".tar")
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target)
        os.close(fd)
        try:
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                tar.add(directory, arcname=".", recursive=True)
            os.chmod(tmp, 0o600)
            os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        sizes[name] = os.path.getsize(final)
    return sizes


def check_snapshot(state_dir: str, app: str, version: str, names: Iterable[str]) -> str:
    """The snapshot directory of ``version``; refuses when a volume's snapshot is missing."""
    source = snapshot_dir(state_dir, app, version)
    missing = sorted(n for n in names if not os.path.isfile(os.path.join(source, n + ".tar")))
    if missing:
        raise StateError("no data snapshot of %s %s for volume(s) %s in %s: snapshots are taken by an upgrade "
                         "with snapshot=true; roll back without restore_snapshot" % (app, version,
                                                                                     ", ".join(missing), source))
    return source


def restore_snapshot(state_dir: str, app: str, version: str, volume_dirs: Mapping[str, str]) -> List[str]:
    """Replace each volume's content by the snapshot of ``version``; refuses before changing anything when a
    snapshot is missing. The components using the volumes must be stopped."""
    source = check_snapshot(state_dir, app, version, volume_dirs)
    restored = []
    for name, directory in sorted(volume_dirs.items()):
        for entry in os.listdir(directory):
            path = os.path.join(directory, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        with tarfile.open(os.path.join(source, name + ".tar")) as tar:
            _extract_all(tar, directory)
        restored.append(name)
    return restored


def _extract_all(tar: tarfile.TarFile, directory: str) -> None:
    # Our own snapshot, but still refuse anything that would leave the volume directory.
    if hasattr(tarfile, "data_filter"):
        tar.extractall(directory, numeric_owner=True, filter="tar")
        return
    for member in tar.getmembers():
        name = os.path.normpath(member.name)
        if name.startswith("..") or os.path.isabs(name) or member.isdev():
            raise StateError("snapshot member %r would leave %s" % (member.name, directory))
    tar.extractall(directory, numeric_owner=True)
