"""The manifest's packages section: what the site's repo host trusts to lay out an apt repository."""

from __future__ import annotations

import copy

import pytest

from offline_delivery_core.bundle.format import BundleError, blob_descriptor, build_manifest, sha256_digest

MODEL = sha256_digest(b"{}")
DEB = sha256_digest(b"deb")
INDEX = sha256_digest(b"Package: docker.io\n")


def _manifest(packages: dict) -> dict:
    return build_manifest(
        name="mini", version="1.0.0", builder={"name": "t", "version": "0"}, platforms=["linux/amd64"],
        model={"digest": MODEL, "size": 2, "mediaType": "m"}, images={},
        blobs=[blob_descriptor(MODEL, 2, "m", ["model"]), blob_descriptor(DEB, 3, "deb", ["packages:x"]),
               blob_descriptor(INDEX, 19, "idx", ["packages:debian-12/amd64"])],
        delta=None, packages=packages)


GOOD = {"debian-12/amd64": {
    "distro": "debian-12", "arch": "amd64", "profiles": ["compose"], "index": INDEX,
    "packages": [{"package": "docker.io", "version": "20.10.24+dfsg1-1+deb12u1", "architecture": "amd64",
                  "filename": "docker.io_20.10.24+dfsg1-1+deb12u1_amd64.deb", "digest": DEB, "size": 3,
                  "profiles": ["compose"]}]}}


def test_valid_packages_section_is_kept():
    assert _manifest(GOOD)["packages"] == GOOD


def test_absent_packages_section_means_none():
    assert _manifest({})["packages"] == {}


@pytest.mark.parametrize("mutate, field, words", [
    (lambda p: p["debian-12/amd64"]["packages"][0].update(filename="../../etc/cron.d/x.deb"),
     "packages.debian-12/amd64.packages[0].filename", "plain .deb file name"),
    (lambda p: p["debian-12/amd64"]["packages"][0].update(filename="sub/docker.io.deb"),
     "packages.debian-12/amd64.packages[0].filename", "plain .deb file name"),
    (lambda p: p["debian-12/amd64"]["packages"][0].update(size=4),
     "packages.debian-12/amd64.packages[0].digest", "same size"),
    (lambda p: p["debian-12/amd64"].update(index=sha256_digest(b"other")),
     "packages.debian-12/amd64.index", "listed blob"),
    (lambda p: p["debian-12/amd64"].update(arch="arm64"),
     "packages.debian-12/amd64", "must match the key"),
    (lambda p: p["debian-12/amd64"]["packages"][0].update(extra=1),
     "packages.debian-12/amd64.packages[0]", "exactly the fields"),
    (lambda p: p.update({"debian 12/amd64": p.pop("debian-12/amd64")}),
     "packages.debian 12/amd64", "'<distro>/<arch>'"),
])
def test_bad_packages_section_is_refused_naming_the_field(mutate, field, words):
    packages = copy.deepcopy(GOOD)
    mutate(packages)
    with pytest.raises(BundleError) as err:
        _manifest(packages)
    assert field in str(err.value) and words in str(err.value)
