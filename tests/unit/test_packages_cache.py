"""The package resolver's caches (bundle_builder/packages.py): a closure is asked of apt once per set of
inputs (apt configuration, minbase status, every index file, the requested packages) and each .deb's control
stanza is read with dpkg-deb once per content; anything else in those inputs asks apt again."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from bundle_builder import packages
from bundle_builder.distros import DebianMirrors
from bundle_builder.packages import Minbase, PackageError, _Wanted

MIRRORS = DebianMirrors(archive="http://mirror.test/debian", security="http://mirror.test/debian-security")
DEB = b"!<arch>\nnot really a deb, its control is faked\n"
CONTROL = "Package: tini\nVersion: 0.19.0-1\nArchitecture: amd64\nDescription: tiny init\n a longer line"


class FakeApt:
    """Stands in for apt-get --print-uris and dpkg-deb, counting the calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self.closures = 0
        self.controls = 0
        status = tmp_path / "minbase" / "status"
        status.parent.mkdir(parents=True)
        status.write_text("Package: base-files\nStatus: install ok installed\nVersion: 12.4\n\n")
        self.minbase = Minbase(status.parent, status.parent / "rootfs.tar", status, {})
        self.sha = hashlib.sha256(DEB).hexdigest()
        monkeypatch.setattr(packages, "minbase_rootfs", lambda *a, **k: self.minbase)
        monkeypatch.setattr(packages, "_ensure_lists", self._lists)
        monkeypatch.setattr(packages, "_closure_uris", self._closure)
        monkeypatch.setattr(packages, "_download_profile", self._download)
        real_run = packages._run
        monkeypatch.setattr(packages, "_run", lambda cmd, **k: self._dpkg_deb(cmd) if cmd[0] == "dpkg-deb"
                            else real_run(cmd, **k))
        self.index = b"Package: tini\nVersion: 0.19.0-1\n"

    def _lists(self, state: packages.AptState, **_kw: object) -> None:
        (state.directory / "lists" / "mirror_dists_bookworm_main_binary-amd64_Packages").write_bytes(self.index)

    def _closure(self, state: packages.AptState, profile: str, args: list[str], workdir: Path) -> list[_Wanted]:
        self.closures += 1
        return [_Wanted("http://mirror.test/debian/pool/t/tini_0.19.0-1_amd64.deb", "tini_0.19.0-1_amd64.deb",
                        len(DEB), self.sha)]

    def _download(self, state: packages.AptState, profile: str, args: list[str], wanted: list[_Wanted],
                  store: Path, workdir: Path, digests: object, progress: object) -> None:
        for w in wanted:
            (store / w.filename).write_bytes(DEB)

    def _dpkg_deb(self, cmd: list[str]) -> object:
        self.controls += 1
        return type("Done", (), {"stdout": CONTROL + "\n"})()


def _resolve(cache: Path, profiles: list[str] | None = None) -> list[packages.PackageFile]:
    return packages.resolve_packages("debian-12", "amd64", profiles or ["compose"], cache_dir=cache, mirrors=MIRRORS)


def test_a_second_resolve_asks_neither_apt_nor_dpkg_deb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    apt = FakeApt(monkeypatch, tmp_path)
    first = _resolve(tmp_path / "cache")
    assert (apt.closures, apt.controls) == (1, 1)
    again = _resolve(tmp_path / "cache")
    assert (apt.closures, apt.controls) == (1, 1), "same inputs: the cached closure and control are used"
    assert again == first and again[0].control == first[0].control == CONTROL
    assert packages.apt_index(again) == packages.apt_index(first)
    assert packages.apt_index(again).decode().startswith(CONTROL + "\nFilename: ./tini_0.19.0-1_amd64.deb\n")


def test_a_changed_index_status_or_request_asks_apt_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    apt = FakeApt(monkeypatch, tmp_path)
    cache = tmp_path / "cache"
    _resolve(cache)
    apt.index += b"Package: newer\n"  # apt update brought a new index
    _resolve(cache)
    assert apt.closures == 2
    apt.minbase.status.write_text("Package: other\nStatus: install ok installed\nVersion: 1\n\n")
    _resolve(cache)
    assert apt.closures == 3
    _resolve(cache, ["compose", "systemd"])  # systemd's closure is new; compose's is kept
    assert apt.closures == 4
    assert apt.controls == 1, "a .deb's control is read once per content, whatever the closure"


def test_file_digests_are_kept_across_builds_while_the_file_is_unchanged(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    hashed: list[str] = []
    real = packages.sha256_file
    monkeypatch.setattr(packages, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    store = tmp_path / "debs"
    store.mkdir()
    deb = store / "tini_0.19.0-1_amd64.deb"
    deb.write_bytes(DEB)
    wanted = _Wanted("http://mirror.test/t.deb", deb.name, len(DEB), hashlib.sha256(DEB).hexdigest())
    memo = tmp_path / "file-digests.json"
    # a file written just now is not recorded: a rewrite within the same timestamp tick would go unseen
    just_written = packages._FileDigests(memo)
    assert packages._cached(store, wanted, just_written) and hashed == [deb.name]
    just_written.save()
    assert packages._cached(store, wanted, packages._FileDigests(memo)) and hashed == [deb.name] * 2
    monkeypatch.setattr(packages._FileDigests, "RACY_NS", -10**18)  # as if the file were old
    first = packages._FileDigests(memo)
    assert packages._cached(store, wanted, first) and len(hashed) == 3
    first.save()
    # the next build (a new process) takes the recorded digest: the file's size, times and inode are unchanged
    assert packages._cached(store, wanted, packages._FileDigests(memo)) and len(hashed) == 3
    # the same size, other bytes (and other times): hashed again, no longer the wanted file, so apt fetches it
    deb.write_bytes(DEB.replace(b"not", b"NOT"))
    os.utime(deb, ns=(10**18, 10**18))
    assert not packages._cached(store, wanted, packages._FileDigests(memo)) and len(hashed) == 4
    # an unreadable record is no record
    memo.write_text("[not a dict")
    assert not packages._cached(store, wanted, packages._FileDigests(memo)) and len(hashed) == 5


def test_a_damaged_cache_entry_is_resolved_anew(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    apt = FakeApt(monkeypatch, tmp_path)
    cache = tmp_path / "cache"
    _resolve(cache)
    (entry,) = (cache / "closures").iterdir()
    entry.write_text("{not json")
    _resolve(cache)
    assert apt.closures == 2
    doc = json.loads(entry.read_text())
    doc["key"] = "0" * 64  # an entry of other inputs under this name (a truncated-hash collision)
    entry.write_text(json.dumps(doc))
    _resolve(cache)
    assert apt.closures == 3
    doc = json.loads(entry.read_text())
    doc["wanted"][0]["filename"] = "../../etc/evil.deb"  # never a path out of the store
    entry.write_text(json.dumps(doc))
    got = _resolve(cache)
    assert apt.closures == 4 and got[0].path == cache / "debs" / "tini_0.19.0-1_amd64.deb"


def test_a_control_that_does_not_match_the_file_name_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    FakeApt(monkeypatch, tmp_path)
    cache = tmp_path / "cache"
    (cache / "control").mkdir(parents=True)
    (cache / "control" / hashlib.sha256(DEB).hexdigest()).write_text(CONTROL.replace("tini", "evil"))
    with pytest.raises(PackageError, match="tini_0.19.0-1_amd64.deb declares .*evil.* does not match its file name"):
        _resolve(cache)
