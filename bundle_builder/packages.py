"""OS packages for a bundle: the dependency closure of each profile, resolved against a minimal install.

For one distro release and architecture:

1. a *minbase* root filesystem of that release and arch is built once with mmdebstrap (arm64 through qemu
   binfmt) and cached by a hash of its recipe; only its dpkg status matters afterwards;
2. a private apt configuration (nothing of the build machine's apt config, sources or keys but the archive
   keyring) whose dpkg status is that minbase's, with the target arch as its only arch, lists for each
   profile the packages a minbase system lacks (``--print-uris``: URL, file name, size, SHA256 from the
   signed index) and refuses a closure that would remove anything;
3. apt downloads what is not cached yet (it checks every hash); each file is checked again against the
   index's SHA256 and its name/version/arch read with ``dpkg-deb -f``; files are kept under
   ``<cache>/debs/`` by file name and reused only when their SHA256 matches, so a second call needs no
   network;
4. a closure's file list is kept in ``<cache>/closures/`` under a hash of everything apt's answer depends
   on (apt configuration, minbase dpkg status, every index file's sha256, the requested packages), and each
   file's control stanza in ``<cache>/control/<sha256>``: a second build with the same index asks neither
   apt nor dpkg-deb (apt's solver alone took ~1.3 s per profile and arch).

The builder turns each :class:`PackageFile` into a blob (``media_type``, ``used_by``) and adds
:func:`package_index` to the manifest. (The tests prove a closure installable from itself:
tests/helpers/closure.py.)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence
from urllib.parse import unquote

from offline_delivery_core.common.digests import sha256_file
from offline_delivery_core.common.files import write_atomic
from offline_delivery_core.common.locks import flock_within

from . import cache_root
from .distros import (
    DEB_MEDIA_TYPE,
    DebianMirrors,
    Distro,
    DistroError,
    apt_source_lines,
    borrowed_codenames,
    check_arch,
    debian_mirrors,
    get_distro,
)

Progress = Callable[[str], None]

# Bump when the way a minbase or the apt state is made changes: old cache entries are then ignored.
RECIPE_VERSION = 1
# Bump when what a cached closure holds, or how it is resolved, changes (see _closure_key).
CLOSURE_VERSION = 1
MERGED_USR_HOOK = Path("/usr/share/mmdebstrap/hooks/merged-usr")

# Bounded waits (seconds) for every external step.
TIMEOUT_MMDEBSTRAP_NATIVE = 900
TIMEOUT_MMDEBSTRAP_FOREIGN = 1800
TIMEOUT_APT_UPDATE = 600
TIMEOUT_APT_QUERY = 180
TIMEOUT_APT_DOWNLOAD = 1800
TIMEOUT_DPKG_DEB = 60
TIMEOUT_LOCK = 2400

_QEMU_BINFMT = {"amd64": "qemu-x86_64", "arm64": "qemu-aarch64"}
# --print-uris: 'URI' file size [MD5Sum:hex] (the hash is left out where the index has no MD5, e.g. security)
_URI_LINE = re.compile(r"^'(?P<uri>[^']+)' (?P<filename>\S+) (?P<size>\d+)(?: (?P<hash>\S+))?\Z")


class PackageError(RuntimeError):
    """Resolving or fetching a closure failed; the message names distro, arch and package(s)."""


@dataclass(frozen=True)
class PackageFile:
    """One .deb of a closure, as kept in the cache."""

    path: Path
    package: str
    version: str
    architecture: str  # the package's own: the target arch or "all"
    sha256: str
    size: int
    filename: str  # the archive's file name (epoch colon written %3a, as apt stores it)
    distro: str
    target_arch: str
    profiles: tuple[str, ...]
    control: str = field(default="", repr=False, compare=False)  # dpkg-deb -f output; "" = read when needed

    media_type: ClassVar[str] = DEB_MEDIA_TYPE

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256}"

    @property
    def used_by(self) -> list[str]:
        """``packages:<distro>/<arch>/<profile>`` for each profile whose closure holds this file."""
        return [f"packages:{self.distro}/{self.target_arch}/{p}" for p in self.profiles]

    def index_entry(self) -> dict[str, object]:
        return {
            "package": self.package,
            "version": self.version,
            "architecture": self.architecture,
            "filename": self.filename,
            "digest": self.digest,
            "size": self.size,
            "profiles": list(self.profiles),
        }


def default_cache_dir() -> Path:
    """``<cache_root()>/packages``."""
    return cache_root() / "packages"


def package_index(files: Iterable[PackageFile]) -> dict[str, dict[str, object]]:
    """The manifest's package index: ``{"<distro>/<arch>": {distro, arch, profiles, packages: [...]}}``,
    entries sorted, so the same closure gives the same bytes."""
    index: dict[str, dict[str, object]] = {}
    for f in sorted(files, key=lambda f: (f.distro, f.target_arch, f.package, f.version, f.architecture)):
        key = f"{f.distro}/{f.target_arch}"
        entry = index.setdefault(key, {"distro": f.distro, "arch": f.target_arch, "profiles": [], "packages": []})
        entry["packages"].append(f.index_entry())  # type: ignore[union-attr]
        entry["profiles"] = sorted(set(entry["profiles"]) | set(f.profiles))  # type: ignore[arg-type]
    return index


def resolve_all(distro_keys: Iterable[str], arches: Iterable[str], profiles: Sequence[str] | None = None, *,
                cache_dir: Path, progress: Progress | None = None) -> list[PackageFile]:
    """:func:`resolve_packages` for every distro × arch (``profiles`` None: all of each distro's profiles)."""
    files: list[PackageFile] = []
    for key in distro_keys:
        row = get_distro(key)
        for arch in dict.fromkeys(check_arch(row, a) for a in arches):
            files += resolve_packages(key, arch, list(profiles or row.profiles), cache_dir=cache_dir,
                                      progress=progress)
    return files


# ---------------------------------------------------------------------------------------------------------
# small helpers


def _say(progress: Progress | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(cmd: Sequence[str], *, timeout: float, what: str, env: dict[str, str] | None = None,
         log: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with a bounded time; on failure raise naming ``what`` with the end of its output."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as exc:
        raise PackageError(f"{what}: timed out after {timeout:.0f} s ({cmd[0]})") from exc
    except FileNotFoundError as exc:
        raise PackageError(f"{what}: {cmd[0]} is not installed on the build machine "
                           f"(scripts/bootstrap installs it)") from exc
    if log is not None:
        log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}", encoding="utf-8")
    if proc.returncode != 0:
        detail = _tail(proc.stderr or proc.stdout)
        where = f" (full log: {log})" if log else ""
        raise PackageError(f"{what}: {cmd[0]} exited {proc.returncode}{where}:\n{detail}")
    return proc


@contextlib.contextmanager
def _locked(path: Path, timeout: float = TIMEOUT_LOCK) -> Iterator[None]:
    """Exclusive lock on ``path`` so concurrent builds sharing a cache do not build the same thing twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        if not flock_within(handle.fileno(), timeout):
            raise PackageError(f"cache lock {path} still held after {timeout:.0f} s by another build; "
                               "wait for it or remove a stale lock")
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _recipe_hash(recipe: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _host_arch() -> str:
    return _run(["dpkg", "--print-architecture"], timeout=30, what="host architecture").stdout.strip()


def _check_emulation(distro: Distro, arch: str) -> None:
    """A foreign-arch minbase runs its maintainer scripts through qemu: binfmt must be on, with flag F."""
    if arch == _host_arch():
        return
    name = _QEMU_BINFMT.get(arch, f"qemu-{arch}")
    entry = Path("/proc/sys/fs/binfmt_misc") / name
    try:
        text = entry.read_text()
    except OSError:
        text = ""
    if not text.startswith("enabled"):
        raise PackageError(
            f"{distro.key}/{arch}: building its minimal root filesystem needs {name} emulation, but {entry} is "
            "not enabled; install qemu-user-static and binfmt-support and run "
            f"'update-binfmts --enable {name}' (scripts/bootstrap does this)")


# ---------------------------------------------------------------------------------------------------------
# the minimal root filesystem


@dataclass(frozen=True)
class Minbase:
    """A cached minbase root filesystem of one release/arch: the tar and its extracted dpkg status."""

    directory: Path
    rootfs_tar: Path
    status: Path
    recipe: dict[str, object]

    def installed(self) -> dict[str, str]:
        """Installed package name → version, from the dpkg status."""
        result: dict[str, str] = {}
        for stanza in self.status.read_text(encoding="utf-8").split("\n\n"):
            fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", stanza, flags=re.M))
            if "Package" in fields and "installed" in fields.get("Status", "").split():
                result[fields["Package"]] = fields.get("Version", "")
        return result


def _minbase_recipe(distro: Distro, arch: str, mirrors: DebianMirrors) -> dict[str, object]:
    return {
        "recipe": RECIPE_VERSION,
        "tool": "mmdebstrap",
        "variant": "minbase",
        "hooks": ["merged-usr"],
        "suite": distro.suite,
        "arch": arch,
        # The release's point-release suite only, as installed from its media: a closure package that needs
        # a newer (security/update) version of something minbase has then brings it along. Never a
        # borrowed suite: it must not replace an essential package.
        "sources": apt_source_lines(distro, mirrors, updates=False, borrowed=False),
    }


def minbase_rootfs(distro: str, arch: str, *, cache_dir: Path, mirrors: DebianMirrors | None = None,
                   progress: Progress | None = None) -> Minbase:
    """The cached minbase root filesystem of ``distro``/``arch``, built with mmdebstrap when missing."""
    row = get_distro(distro)
    arch = check_arch(row, arch)
    mirrors = mirrors or debian_mirrors()
    recipe = _minbase_recipe(row, arch, mirrors)
    directory = cache_dir / "minbase" / f"{row.key}-{arch}-{_recipe_hash(recipe)}"
    result = Minbase(directory, directory / "rootfs.tar", directory / "status", recipe)
    done = directory / "recipe.json"  # written last: its presence means the entry is whole
    with _locked(cache_dir / "locks" / f"{directory.name}.lock"):
        if done.exists() and result.status.exists() and result.rootfs_tar.exists():
            return result
        _check_emulation(row, arch)
        if not MERGED_USR_HOOK.is_dir():
            raise PackageError(f"{row.key}/{arch}: mmdebstrap's merged-usr hook {MERGED_USR_HOOK} is missing; "
                               "install mmdebstrap (scripts/bootstrap does)")
        directory.mkdir(parents=True, exist_ok=True)
        _say(progress, f"{row.key}/{arch}: building a minbase root filesystem with mmdebstrap "
                       f"(cached in {directory}; under emulation this takes minutes)")
        partial = directory / "partial-rootfs.tar"  # mmdebstrap picks the format from the .tar suffix
        partial.unlink(missing_ok=True)
        cmd = ["mmdebstrap", "--variant=minbase", f"--architectures={arch}", f"--hook-dir={MERGED_USR_HOOK}",
               row.suite, str(partial), *recipe["sources"]]  # type: ignore[list-item]
        foreign = arch != _host_arch()
        _run(cmd, timeout=TIMEOUT_MMDEBSTRAP_FOREIGN if foreign else TIMEOUT_MMDEBSTRAP_NATIVE,
             what=f"{row.key}/{arch}: mmdebstrap minbase", log=directory / "mmdebstrap.log")
        _extract_status(partial, result.status, f"{row.key}/{arch}")
        os.replace(partial, result.rootfs_tar)
        done.write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _say(progress, f"{row.key}/{arch}: minbase ready ({len(result.installed())} packages)")
    return result


def _extract_status(tar_path: Path, out: Path, label: str) -> None:
    with tarfile.open(tar_path) as tar:
        for name in ("./var/lib/dpkg/status", "var/lib/dpkg/status"):
            try:
                member = tar.getmember(name)
            except KeyError:
                continue
            handle = tar.extractfile(member)
            if handle is None:
                break
            out.write_bytes(handle.read())
            return
    raise PackageError(f"{label}: {tar_path} has no var/lib/dpkg/status; the mmdebstrap run did not finish")


# ---------------------------------------------------------------------------------------------------------
# the private apt configuration


@dataclass(frozen=True)
class AptState:
    """A private apt configuration for one release/arch over a minbase's dpkg status."""

    directory: Path
    config: Path
    label: str  # "<distro>/<arch>", for messages

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("APT_", "DEBIAN_"))}
        env.update({"APT_CONFIG": str(self.config), "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"})
        return env

    def apt_get(self, args: Sequence[str], *, timeout: float, what: str) -> subprocess.CompletedProcess[str]:
        return _run(["apt-get", *args], timeout=timeout, env=self.env(), what=f"{self.label}: {what}")


def _write_apt_config(directory: Path, *, arch: str, status: Path, sources: Sequence[str],
                      preferences: str) -> Path:
    empty = directory / "empty"
    for sub in ("empty", "lists/partial", "cache/archives/partial", "state", "log"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    (directory / "sources.list").write_text("\n".join(sources) + "\n", encoding="utf-8")
    (directory / "preferences").write_text(preferences, encoding="utf-8")
    (directory / "main.conf").write_text("", encoding="utf-8")
    settings = {
        "Dir::Etc::main": directory / "main.conf",
        "Dir::Etc::Parts": empty,
        "Dir::Etc::SourceList": directory / "sources.list",
        "Dir::Etc::SourceParts": empty,
        "Dir::Etc::Preferences": directory / "preferences",
        "Dir::Etc::PreferencesParts": empty,
        "Dir::Etc::TrustedParts": empty,
        "Dir::State": directory / "state",
        "Dir::State::Lists": directory / "lists",
        "Dir::State::status": status,
        "Dir::Cache": directory / "cache",
        "Dir::Cache::srcpkgcache": "",  # a second 60 MB copy of the binary cache otherwise
        "Dir::Log": directory / "log",
        "APT::Architecture": arch,
        "APT::Install-Recommends": "false",
        "APT::Install-Suggests": "false",
        "APT::Sandbox::User": "root",
        "Acquire::Languages": "none",
        # Keep the lists compressed on disk (a borrowed suite's index is large).
        "Acquire::GzipIndexes": "true",
        "Acquire::Retries": "3",
        "Acquire::http::Timeout": "60",
        "Acquire::https::Timeout": "60",
        "Binary::apt-get::Acquire::AllowInsecureRepositories": "false",
        # Only reads and downloads happen here, under our own lock; nothing is installed.
        "Debug::NoLocking": "true",
    }
    lines = [f'{k} "{v}";' for k, v in settings.items()]
    lines.append(f'APT::Architectures {{ "{arch}"; }};')
    lines.append('Acquire::CompressionTypes::Order { "gz"; };')
    config = directory / "apt.conf"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


def _apt_state(row: Distro, arch: str, mirrors: DebianMirrors, minbase: Minbase, cache_dir: Path) -> AptState:
    sources = apt_source_lines(row, mirrors)
    pins = "".join(f"Package: *\nPin: release n={name}\nPin-Priority: 1\n\n"
                   for name in borrowed_codenames(row, mirrors))
    recipe = {"recipe": RECIPE_VERSION, "arch": arch, "sources": sources, "pins": pins,
              "minbase": minbase.directory.name}
    directory = cache_dir / "apt" / f"{row.key}-{arch}-{_recipe_hash(recipe)}"
    config = _write_apt_config(directory, arch=arch, status=minbase.status, sources=sources, preferences=pins)
    return AptState(directory, config, f"{row.key}/{arch}")


def _ensure_lists(state: AptState, *, refresh: bool, max_age: float | None, progress: Progress | None) -> None:
    """Fetch the package index when missing, asked to, or older than ``max_age`` s; if a refresh of existing
    lists fails (offline), go on with them and say so."""
    stamp = state.directory / "lists" / ".updated"
    have = stamp.exists()
    age = time.time() - stamp.stat().st_mtime if have else None
    if have and not refresh and (max_age is None or (age is not None and age <= max_age)):
        return
    _say(progress, f"{state.label}: updating the package index")
    try:
        # --error-on=any: without it apt-get update exits 0 when a source cannot be fetched.
        state.apt_get(["update", "-q", "--error-on=any"], timeout=TIMEOUT_APT_UPDATE,
                      what="apt-get update of the private index")
    except PackageError as exc:
        if not have:
            raise
        _say(progress, f"{state.label}: WARNING: index refresh failed, using the index of "
                       f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(stamp.stat().st_mtime))}: {exc}")
        return
    stamp.touch()


# ---------------------------------------------------------------------------------------------------------
# closure listing and download


@dataclass(frozen=True)
class _Wanted:
    uri: str
    filename: str
    size: int
    sha256: str


def _explain_apt_error(exc: PackageError, label: str, profile: str, args: Sequence[str]) -> PackageError:
    text = str(exc)
    missing = re.findall(r"Unable to locate package (\S+)", text)
    missing += re.findall(r"Package '?([^' ]+)'? has no installation candidate", text)
    missing += [f"{p} (in {r})" for r, p in re.findall(r"Release '([^']+)' for '([^']+)' was not found", text)]
    if missing:
        return PackageError(f"{label}: profile {profile!r}: package(s) {', '.join(missing)} not available in "
                            f"this release for this architecture; fix the profile in bundle_builder/distros.py."
                            f"\n{text}")
    return PackageError(f"{label}: profile {profile!r}: cannot resolve {' '.join(args)}:\n{text}")


def _closure_uris(state: AptState, profile: str, args: Sequence[str], workdir: Path) -> list[_Wanted]:
    """What a minbase system lacks to install ``args``, as apt would fetch it (from the signed index)."""
    empty = Path(tempfile.mkdtemp(prefix="archives-", dir=workdir))
    (empty / "partial").mkdir()
    try:
        # One run gives both the summary (to refuse removals) and the URI lines.
        out = state.apt_get(["--print-uris", "-o", f"Dir::Cache::archives={empty}", "install", "-y",
                             "--no-install-recommends", *args], timeout=TIMEOUT_APT_QUERY,
                            what=f"list closure of {profile}")
    except PackageError as exc:
        raise _explain_apt_error(exc, state.label, profile, args) from None
    removed = _removed_packages(out.stdout)
    if removed:
        raise PackageError(f"{state.label}: profile {profile!r} would remove {', '.join(removed)} from a "
                           "minimal install; a target host could not install it as is")
    listed = []
    for line in (raw.strip() for raw in out.stdout.splitlines()):
        if not line.startswith("'"):
            continue  # apt's summary text
        match = _URI_LINE.match(line)
        if match is None:  # never drop a URI line silently: it would be a package missing on site
            raise PackageError(f"{state.label}: unexpected line from apt-get --print-uris: {line!r}")
        listed.append(match)
    summary = re.search(r"^(\d+) upgraded, (\d+) newly installed", out.stdout, flags=re.M)
    if summary is None or int(summary[1]) + int(summary[2]) != len(listed):
        raise PackageError(f"{state.label}: profile {profile!r}: apt's summary does not match the {len(listed)} "
                           f"file(s) it listed; output:\n{_tail(out.stdout)}")
    if not listed:
        return []
    # --print-uris names the first hash of the index (MD5Sum): take the SHA256 of the same record.
    records = _index_records(state, [_split_filename(m["filename"]) for m in listed])
    wanted = []
    for m in listed:
        name, version, deb_arch = _split_filename(m["filename"])
        algo, _sep, value = (m["hash"] or "").partition(":")
        field = {"MD5SUM": "MD5sum", "SHA256": "SHA256", "SHA1": "SHA1", "SHA512": "SHA512"}.get(algo.upper())
        matches = {r["SHA256"] for r in records.get((name, version, deb_arch), [])
                   if r.get("SHA256") and r.get("Size") == m["size"]
                   and (field is None or r.get(field, "").lower() == value.lower())}
        if len(matches) != 1:
            raise PackageError(f"{state.label}: no single SHA256 in the signed index for {m['filename']} "
                               f"({algo} {value}); the index may be stale: retry with a refresh")
        wanted.append(_Wanted(m["uri"], m["filename"], int(m["size"]), matches.pop().lower()))
    return wanted


def _removed_packages(apt_output: str) -> list[str]:
    """Names under apt's "The following packages will be REMOVED:" (indented continuation lines)."""
    match = re.search(r"^The following packages will be REMOVED:\n((?:[ \t]+.*\n?)+)", apt_output, flags=re.M)
    names = [n.rstrip("*") for n in match.group(1).split()] if match else []
    count = re.search(r"(\d+) to remove", apt_output)
    if not names and count and int(count[1]) > 0:
        names = [f"{count[1]} package(s)"]
    return names


def _split_filename(filename: str) -> tuple[str, str, str]:
    """``name_version_arch.deb`` (epoch ``%3a``) → (name, version, arch)."""
    stem = filename[:-len(".deb")] if filename.endswith(".deb") else filename
    parts = [unquote(p) for p in stem.split("_")]
    if len(parts) != 3:
        raise PackageError(f"unexpected package file name {filename!r} (want name_version_arch.deb)")
    return parts[0], parts[1], parts[2]


_Records = dict[tuple[str, str, str], list[dict[str, str]]]


def _index_records(state: AptState, keys: Sequence[tuple[str, str, str]]) -> _Records:
    """Index records (``apt-cache show name=version``) by (package, version, architecture)."""
    args = sorted({f"{n}={v}" for n, v, _arch in keys})
    out = _run(["apt-cache", "show", *args], timeout=TIMEOUT_APT_QUERY, env=state.env(),
               what=f"{state.label}: read index records").stdout
    records: _Records = {}
    for stanza in out.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z0-9-]+): (.*)$", stanza, flags=re.M))
        if "Package" in fields:
            key = (fields["Package"], fields.get("Version", ""), fields.get("Architecture", ""))
            records.setdefault(key, []).append(fields)
    return records


class _FileDigests:
    """The sha256 of files of the package cache (its .debs, apt's index files), kept across builds in
    ``<cache>/file-digests.json`` under each file's size, mtime, ctime and inode, as git's index keeps stat
    data: a file changed in any way is hashed again, an unchanged one is not. Every carried .deb is hashed
    once more as the bundle is written, so a file that rotted in place still cannot reach a bundle."""

    # Timestamps are coarse: a file rewritten within a tick of its recording could keep its size and times.
    # A file changed this recently is not recorded (hashed again next time), as git treats "racily clean"
    # entries of its index.
    RACY_NS = 2_000_000_000

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            known = json.loads(path.read_bytes())
        except (OSError, ValueError):
            known = {}
        self._known: dict[str, Any] = known if isinstance(known, dict) else {}
        self._changed = False

    def sha256(self, path: Path) -> str:
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        known = self._known.get(str(path))
        if isinstance(known, list) and len(known) == 5 and known[:4] == stamp:
            return str(known[4])
        digest = sha256_file(path)
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > self.RACY_NS:
            self._known[str(path)] = [*stamp, digest]
            self._changed = True
        return digest

    def save(self) -> None:
        """Write what was hashed anew, without the entries of files gone since (best effort)."""
        if self._changed:
            kept = {name: entry for name, entry in self._known.items() if os.path.exists(name)}
            try:
                write_atomic(str(self.path), json.dumps(kept, sort_keys=True).encode())
            except OSError:
                pass
            self._changed = False


def _cached(store: Path, item: _Wanted, digests: _FileDigests) -> bool:
    path = store / item.filename
    try:
        return path.stat().st_size == item.size and digests.sha256(path) == item.sha256
    except FileNotFoundError:
        return False


def _download_profile(state: AptState, profile: str, args: Sequence[str], wanted: Sequence[_Wanted],
                      store: Path, workdir: Path, digests: _FileDigests, progress: Progress | None) -> None:
    """Let apt fetch what the store lacks (into a scratch dir holding links to what it has), check, keep."""
    missing = [w for w in wanted if not _cached(store, w, digests)]
    if not missing:
        return
    megabytes = sum(w.size for w in missing) / 1e6
    _say(progress, f"{state.label}: profile {profile}: downloading {len(missing)} package(s), {megabytes:.1f} MB")
    scratch = Path(tempfile.mkdtemp(prefix="download-", dir=workdir))
    (scratch / "partial").mkdir()
    for w in wanted:
        if w not in missing:
            os.link(store / w.filename, scratch / w.filename)
    try:
        state.apt_get(["-o", f"Dir::Cache::archives={scratch}", "install", "-y", "-q", "--download-only",
                       "--no-install-recommends", *args], timeout=TIMEOUT_APT_DOWNLOAD,
                      what=f"download closure of {profile}")
    except PackageError as exc:
        raise _explain_apt_error(exc, state.label, profile, args) from None
    for w in missing:
        got = scratch / w.filename
        if not got.exists():
            raise PackageError(f"{state.label}: apt did not download {w.filename} ({w.uri})")
        digest = sha256_file(got)
        if digest != w.sha256 or got.stat().st_size != w.size:
            raise PackageError(f"{state.label}: {w.filename} does not match the archive index "
                               f"(sha256 {digest}, index says {w.sha256}); refusing it")
        os.replace(got, store / w.filename)


def _deb_control(store: Path, item: _Wanted, label: str) -> str:
    """The control stanza of a store file (``dpkg-deb -f``), kept in ``<cache>/control/<sha256>``: a .deb's
    control is fixed by its content, and the store file was just checked against ``item.sha256``."""
    kept = store.parent / "control" / item.sha256
    try:
        return kept.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    text = _run(["dpkg-deb", "-f", str(store / item.filename)], timeout=TIMEOUT_DPKG_DEB,
                what=f"{label}: read control of {item.filename}").stdout.rstrip("\n")
    write_atomic(str(kept), text.encode())  # whole or not at all: other builds may read it meanwhile
    return text


def _package_file(store: Path, item: _Wanted, row: Distro, arch: str, profiles: tuple[str, ...]) -> PackageFile:
    path = store / item.filename
    label = f"{row.key}/{arch}"
    control = _deb_control(store, item, label)
    fields = dict(re.findall(r"^(Package|Version|Architecture): (.*)$", control, flags=re.M))
    name, version, deb_arch = _split_filename(item.filename)
    if (fields.get("Package"), fields.get("Version"), fields.get("Architecture")) != (name, version, deb_arch):
        raise PackageError(f"{label}: {item.filename} declares {fields} which does not match its file name")
    if deb_arch not in (arch, "all"):
        raise PackageError(f"{label}: {item.filename} is for architecture {deb_arch}, not {arch} or all")
    return PackageFile(path=path, package=name, version=version, architecture=deb_arch, sha256=item.sha256,
                       size=item.size, filename=item.filename, distro=row.key, target_arch=arch,
                       profiles=profiles, control=control)


# ---------------------------------------------------------------------------------------------------------
# cached closures


def _closure_inputs(state: AptState, minbase: Minbase, digests: _FileDigests) -> dict[str, object]:
    """What every closure of one release/arch is a function of besides the requested packages: the private
    apt configuration (sources, pins, arch, minbase), the minbase's dpkg status and the package index apt
    holds (every list file's sha256)."""
    lists = state.directory / "lists"
    index = sorted((p.name, digests.sha256(p)) for p in lists.iterdir() if p.is_file() and not p.name.startswith("."))
    return {"closure": CLOSURE_VERSION, "recipe": RECIPE_VERSION, "state": state.directory.name,
            "config": state.config.read_text(encoding="utf-8"), "status": sha256_file(minbase.status),
            "index": index}


def _closure_key(inputs: dict[str, object], profile: str, args: Sequence[str]) -> str:
    """The cache key of one profile's closure: the same key gives the same ``apt-get --print-uris`` answer."""
    doc = {**inputs, "profile": profile, "args": list(args)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _closure_path(cache_dir: Path, state: AptState, key: str) -> Path:
    return cache_dir / "closures" / f"{state.directory.name}-{key[:24]}.json"


def _load_closure(path: Path, key: str) -> list[_Wanted] | None:
    """A closure resolved before with the same key; None when there is none (or it is unreadable)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("key") != key:
            return None
        wanted = [_Wanted(str(w["uri"]), str(w["filename"]), int(w["size"]), str(w["sha256"]))
                  for w in doc["wanted"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if any(not re.fullmatch(r"[^/\x00]+\.deb", w.filename) or not re.fullmatch(r"[0-9a-f]{64}", w.sha256)
           for w in wanted):
        return None  # a plain file name in the store and a sha256, as apt's answer gave them, or resolve anew
    return wanted


def _store_closure(path: Path, key: str, wanted: Sequence[_Wanted]) -> None:
    doc = {"key": key, "wanted": [{"uri": w.uri, "filename": w.filename, "size": w.size, "sha256": w.sha256}
                                  for w in wanted]}
    write_atomic(str(path), (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def resolve_packages(distro: str, arch: str, profiles: list[str], *, cache_dir: Path,
                     progress: Progress | None = None, mirrors: DebianMirrors | None = None,
                     refresh: bool = False, max_index_age: float | None = 86400.0) -> list[PackageFile]:
    """The .deb files a minimal ``distro``/``arch`` host lacks to install every package of ``profiles``.

    ``cache_dir`` holds the minbase root filesystems, the private apt state and the downloaded files (use
    :func:`default_cache_dir`). The package index is refreshed when older than ``max_index_age`` seconds
    (None: never) or when ``refresh``; a second call with a fresh index needs no network. Each file lists
    the profiles whose closure holds it. Raises :class:`PackageError` or :class:`DistroError` naming the
    distro, arch and package.
    """
    row = get_distro(distro)
    if row.package_format != "deb":
        raise DistroError(f"{row.key}: package format {row.package_format!r} is not implemented")
    arch = check_arch(row, arch)
    if not profiles:
        raise DistroError(f"{row.key}/{arch}: no package profile asked for; known: {', '.join(sorted(row.profiles))}")
    refs = {p: row.packages(p) for p in dict.fromkeys(profiles)}
    mirrors = mirrors or debian_mirrors()
    cache_dir = Path(cache_dir)
    minbase = minbase_rootfs(row.key, arch, cache_dir=cache_dir, mirrors=mirrors, progress=progress)
    store = cache_dir / "debs"
    store.mkdir(parents=True, exist_ok=True)
    (cache_dir / "tmp").mkdir(exist_ok=True)
    with _locked(cache_dir / "locks" / f"apt-{row.key}-{arch}.lock"), \
            tempfile.TemporaryDirectory(prefix="resolve-", dir=cache_dir / "tmp") as tmp:
        state = _apt_state(row, arch, mirrors, minbase, cache_dir)
        _ensure_lists(state, refresh=refresh, max_age=max_index_age, progress=progress)
        owners: dict[str, list[str]] = {}
        items: dict[str, _Wanted] = {}
        digests = _FileDigests(cache_dir / "file-digests.json")
        inputs = _closure_inputs(state, minbase, digests)
        for profile, pkgs in refs.items():
            args = [r.apt_arg() for r in pkgs]
            key = _closure_key(inputs, profile, args)
            kept = _closure_path(cache_dir, state, key)
            wanted = _load_closure(kept, key)
            if wanted is None:
                wanted = _closure_uris(state, profile, args, Path(tmp))
                _store_closure(kept, key, wanted)
            _download_profile(state, profile, args, wanted, store, Path(tmp), digests, progress)
            for w in wanted:
                items[w.filename] = w
                owners.setdefault(w.filename, []).append(profile)
            _say(progress, f"{state.label}: profile {profile}: {len(wanted)} package(s) beyond minbase")
        files = [_package_file(store, items[f], row, arch, tuple(sorted(owners[f]))) for f in sorted(items)]
        digests.save()
    return sorted(files, key=lambda f: (f.package, f.version, f.architecture))


# ---------------------------------------------------------------------------------------------------------
# the flat apt repository index


def apt_index(files: Sequence[PackageFile]) -> bytes:
    """The apt ``Packages`` stanzas of ``files`` for a flat repository (``Filename: ./<file>``), sorted so
    the same closure gives the same bytes. The builder ships it as a blob; the site's repo host serves the
    union of the indexes of its releases without needing dpkg-dev."""
    stanzas = []
    for f in sorted(files, key=lambda f: f.filename):
        control = f.control or _run(["dpkg-deb", "-f", str(f.path)], timeout=TIMEOUT_DPKG_DEB,
                                    what=f"read control of {f.filename}").stdout.rstrip("\n")
        stanzas.append(f"{control}\nFilename: ./{f.filename}\nSize: {f.size}\nSHA256: {f.sha256}\n")
    return "\n".join(stanzas).encode()
