"""The bundle's SBOM (CycloneDX 1.5): dpkg/apk databases read from layers with whiteouts, the carried
packages and files, schema validity (the official schema, through cyclonedx-python-lib), canonical purls
(packageurl-python), determinism, the manifest binding, `bundle-builder sbom`, old bundles without one, and
the site's copy beside the release."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from packageurl import PackageURL

from bundle_builder import build, cli
from bundle_builder import images as img
from bundle_builder import sbom
from offline_delivery_core.bundle import format as bundle_format
from offline_delivery_core.bundle.format import BundleError
from offline_delivery_core.common.oci import OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD
from offline_delivery_core.site.repo import SBOM_FILE, SiteRepo, import_bundle
from offline_delivery_core.site.status import build_status
from tests.helpers.images import TestImage, tar_bytes, write_docker_archive, write_oci_layout

PLATFORMS = ["linux/amd64", "linux/arm64"]
DEBIAN = b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'


def stanza(name: str, version: str, arch: str, status: str = "install ok installed", source: str = "") -> str:
    text = f"Package: {name}\nStatus: {status}\nVersion: {version}\nArchitecture: {arch}\n"
    if source:
        text += f"Source: {source}\n"
    return text + "Description: a package\n with a long\n .\n description\n"


def status(*stanzas: str) -> bytes:
    return "\n".join(stanzas).encode()


def base_layer(arch: str) -> bytes:
    return tar_bytes({
        "etc/os-release": DEBIAN,
        "var/lib/dpkg/status": status(stanza("libc6", "2.36-9+deb12u4", arch, source="glibc"),
                                      stanza("bsdutils", "1:2.38.1-5+deb12u3", arch,
                                             source="util-linux (2.38.1-5+deb12u3)"),
                                      stanza("gone", "1.0", arch, status="deinstall ok config-files")),
        "var/lib/dpkg/status.d/distroless-x": status(stanza("distroless-x", "3", arch).replace(
            "Status: install ok installed\n", "")),
        "var/lib/dpkg/status.d/distroless-x.md5sums": b"0123  usr/bin/x\n",
        "bin/sh": b"#!shell\n",
    })


def top_layer(arch: str) -> bytes:
    """dpkg upgraded libc6 and installed redis; distroless-x deleted; status.d emptied and refilled."""
    return tar_bytes({
        "var/lib/dpkg/status": status(stanza("libc6", "2.36-9+deb12u9", arch, source="glibc"),
                                      stanza("bsdutils", "1:2.38.1-5+deb12u3", arch,
                                             source="util-linux (2.38.1-5+deb12u3)"),
                                      stanza("redis-server", "5:7.0.15-1~deb12u1", arch, source="redis")),
        "var/lib/dpkg/status.d/.wh..wh..opq": b"",
        "var/lib/dpkg/status.d/late": status(stanza("late", "0.1", arch)),
        "etc/.wh.motd": b"",
    })


def images(tag: str = "1.0.0") -> list[TestImage]:
    return [TestImage(f"sbom/app:{tag}", arch, [base_layer(arch), top_layer(arch)],
                      variant="v8" if arch == "arm64" else None) for arch in ("amd64", "arm64")]


MODEL = """\
apiVersion: offline.delivery/v1
kind: Application
name: sbomdemo
version: {version}
components:
  app:
    image: sbom/app:{tag}
"""


def write_model(directory: Path, version: str = "1.0.0", tag: str = "1.0.0") -> Path:
    path = directory / f"app-{version}.yml"
    path.write_text(MODEL.format(version=version, tag=tag))
    return path


def blob(data: bytes, media_type: str = OCI_LAYER) -> img.Blob:
    return img.small_blob(data, media_type)


def packages_of(builder: sbom.SbomBuilder, ref: str) -> set[tuple[str, str]]:
    comps = builder.components.by_ref
    return {(comps[r]["name"], comps[r]["version"]) for r in builder.dependencies[ref] if r.startswith("pkg:")}


# ----------------------------------------------------------------------------------------------------------
# Reading the package databases


def test_dpkg_status_keeps_installed_packages_and_their_source() -> None:
    text = status(stanza("libc6", "2.36-9", "amd64", source="glibc"),
                  stanza("bsdutils", "1:2.38", "amd64", source="util-linux (2.38.1)"),
                  stanza("same", "1.0", "all", source="same (1.0)"),
                  stanza("gone", "1.0", "amd64", status="deinstall ok config-files"),
                  stanza("half", "1.0", "amd64", status="install reinstreq half-installed")).decode()
    pkgs = sbom.dpkg_packages(text)
    assert [(p.name, p.version, p.arch, p.source) for p in pkgs] == [
        ("libc6", "2.36-9", "amd64", "glibc"), ("bsdutils", "1:2.38", "amd64", "util-linux@2.38.1"),
        ("same", "1.0", "all", "same")]


def test_layers_in_order_with_whiteouts_opaque_directories_and_gzip() -> None:
    for media_type, pack in ((OCI_LAYER, lambda b: b), (OCI_LAYER_GZIP, lambda b: gzip.compress(b, mtime=0))):
        builder = sbom.SbomBuilder("x", "1", {"name": "bundle-builder", "version": "t"})
        layers = [blob(pack(base_layer("amd64")), media_type), blob(pack(top_layer("amd64")), media_type)]
        builder.add_image(sbom.ImageInput("app", "sbom/app:1.0.0", "linux/amd64", "sha256:" + "1" * 64, layers))
        builder.add_image(sbom.ImageInput("base", "sbom/base:1.0.0", "linux/amd64", "sha256:" + "2" * 64,
                                          layers[:1]))
        assert packages_of(builder, "image:app@linux/amd64") == {
            ("libc6", "2.36-9+deb12u9"), ("bsdutils", "1:2.38.1-5+deb12u3"), ("redis-server", "5:7.0.15-1~deb12u1"),
            ("late", "0.1")}, media_type
        assert packages_of(builder, "image:base@linux/amd64") == {
            ("libc6", "2.36-9+deb12u4"), ("bsdutils", "1:2.38.1-5+deb12u3"), ("distroless-x", "3")}
        assert builder.layers_read == 2  # the shared base layer was read once
        assert "os:debian@12" in builder.dependencies["image:app@linux/amd64"]


def test_a_whiteout_of_the_whole_database_and_a_replaced_file() -> None:
    builder = sbom.SbomBuilder("x", "1", {"name": "bundle-builder", "version": "t"})
    gone = tar_bytes({"var/lib/.wh.dpkg": b""})
    builder.add_image(sbom.ImageInput("a", "a/a:1", "linux/amd64", "sha256:" + "1" * 64,
                                      [blob(base_layer("amd64")), blob(gone)]))
    assert packages_of(builder, "image:a@linux/amd64") == set()
    # the same whiteout with a new database in its own layer: the layer's own files stay
    again = tar_bytes({"var/lib/.wh.dpkg": b"", "var/lib/dpkg/status": status(stanza("fresh", "2", "amd64"))})
    builder.add_image(sbom.ImageInput("b", "b/b:1", "linux/amd64", "sha256:" + "2" * 64,
                                      [blob(base_layer("amd64")), blob(again)]))
    assert packages_of(builder, "image:b@linux/amd64") == {("fresh", "2")}


def test_zstd_layers_hard_links_and_an_image_without_packages() -> None:
    builder = sbom.SbomBuilder("x", "1", {"name": "bundle-builder", "version": "t"})
    zstd = subprocess.run(["zstd", "-c", "-q"], input=base_layer("amd64"), capture_output=True, check=True,
                          timeout=60).stdout  # scripts/bootstrap installs zstd
    builder.add_image(sbom.ImageInput("z", "z/z:1", "linux/amd64", "sha256:" + "1" * 64,
                                      [blob(zstd, OCI_LAYER_ZSTD)]))
    assert packages_of(builder, "image:z@linux/amd64") == {
        ("libc6", "2.36-9+deb12u4"), ("bsdutils", "1:2.38.1-5+deb12u3"), ("distroless-x", "3")}
    linked = io.BytesIO()
    with tarfile.open(fileobj=linked, mode="w") as tar:
        data = status(stanza("linked", "1", "amd64"))
        info = tarfile.TarInfo("var/lib/dpkg/status-old")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("var/lib/dpkg/status")
        link.type, link.linkname = tarfile.LNKTYPE, "var/lib/dpkg/status-old"
        tar.addfile(link)
    builder.add_image(sbom.ImageInput("l", "l/l:1", "linux/amd64", "sha256:" + "2" * 64, [blob(linked.getvalue())]))
    assert packages_of(builder, "image:l@linux/amd64") == {("linked", "1")}
    builder.add_image(sbom.ImageInput("e", "e/e:1", "linux/amd64", "sha256:" + "3" * 64,
                                      [blob(tar_bytes({"bin/app": b"static"}))]))
    assert packages_of(builder, "image:e@linux/amd64") == set()
    assert JsonStrictValidator(SchemaVersion.V1_5).validate_str(builder.to_bytes().decode()) is None


def test_alpine_apk_database() -> None:
    builder = sbom.SbomBuilder("x", "1", {"name": "bundle-builder", "version": "t"})
    layer = tar_bytes({"etc/os-release": b"ID=alpine\nVERSION_ID=3.19.1\n",
                       "lib/apk/db/installed": b"C:Q1abc=\nP:musl\nV:1.2.4-r2\nA:x86_64\no:musl\n\n"
                                               b"P:libcrypto3\nV:3.1.4-r5\nA:x86_64\no:openssl\n\n"})
    builder.add_image(sbom.ImageInput("a", "a/a:1", "linux/amd64", "sha256:" + "1" * 64, [blob(layer)]))
    refs = {r for r in builder.dependencies["image:a@linux/amd64"] if r.startswith("pkg:")}
    assert refs == {"pkg:apk/alpine/musl@1.2.4-r2?arch=x86_64&distro=alpine-3.19.1",
                    "pkg:apk/alpine/libcrypto3@3.1.4-r5?arch=x86_64&distro=alpine-3.19.1&upstream=openssl"}


def test_timestamp_is_the_newest_image_creation_in_utc() -> None:
    assert sbom._timestamp(["2024-01-02T03:04:05.123456789Z", "2025-05-20T02:00:00+02:00", "junk", ""]) == \
        "2025-05-20T00:00:00Z"
    assert sbom._timestamp([]) is None


# ----------------------------------------------------------------------------------------------------------
# The SBOM of a built bundle


@pytest.fixture
def made(tmp_path: Path, keypair) -> dict:  # type: ignore[no-untyped-def]
    layout = write_oci_layout(tmp_path / "oci", images(), gzip_layers=True)
    archive = write_docker_archive(tmp_path / "images.tar", images())
    model = write_model(tmp_path)
    binary = tmp_path / "tool"
    binary.write_bytes(b"\x7fELF tool v2")
    binary.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    result = build.build_bundle(model, out, image_sources=[f"oci:{layout}"], platforms=PLATFORMS,
                                sign_key=keypair[0], files=[f"tool@2.0/amd64={binary}"])
    return {"result": result, "layout": layout, "archive": archive, "model": model, "binary": binary,
            "tmp": tmp_path}


def _sbom_of(path: Path) -> tuple[dict, bytes, dict]:
    manifest = bundle_format.read_head(str(path)).manifest
    desc = bundle_format.sbom_descriptor(manifest)
    assert desc is not None
    data = bundle_format.read_blob(str(path), desc["digest"])
    return desc, data, manifest


def test_bundle_carries_a_valid_sbom_bound_by_the_signed_manifest(made) -> None:  # type: ignore[no-untyped-def]
    desc, data, manifest = _sbom_of(made["result"].path)
    assert manifest["blobs"][1] == desc  # right after the model
    assert desc["usedBy"] == ["sbom"] and desc["bundled"] and desc["mediaType"] == "application/vnd.cyclonedx+json"
    assert JsonStrictValidator(SchemaVersion.V1_5).validate_str(data.decode()) is None  # the official schema
    doc = json.loads(data)
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.5"
    assert doc["metadata"]["component"] == {"type": "application", "bom-ref": "release", "name": "sbomdemo",
                                            "version": "1.0.0"}
    comps = {c["bom-ref"]: c for c in doc["components"]}
    for comp in comps.values():  # purls in the canonical form of the reference implementation
        if "purl" in comp:
            assert PackageURL.from_string(comp["purl"]).to_string() == comp["purl"]
    image = comps["image:app@linux/arm64"]
    assert image["type"] == "container"
    assert image["purl"] == ("pkg:oci/app@" + manifest["images"]["app"]["manifests"]["linux/arm64"]
                             + "?arch=arm64&repository_url=sbom/app&tag=1.0.0")
    libc = "pkg:deb/debian/libc6@2.36-9%2Bdeb12u9?arch=arm64&distro=debian-12&upstream=glibc"
    assert libc in comps and "pkg:deb/debian/libc6@2.36-9%2Bdeb12u4?arch=arm64&distro=debian-12&upstream=glibc" \
        not in comps  # only what the top layer left
    # the source version differs from the binary's (no epoch): it travels in the upstream qualifier
    assert "pkg:deb/debian/bsdutils@1:2.38.1-5%2Bdeb12u3?arch=amd64&distro=debian-12&upstream=util-linux%402.38.1-5%2Bdeb12u3" \
        in comps
    # the source package as Trivy reads it (its own properties; it fills the rest from the binary's version)
    assert comps[libc]["properties"] == [{"name": "aquasecurity:trivy:SrcName", "value": "glibc"}]
    bsdutils = comps["pkg:deb/debian/bsdutils@1:2.38.1-5%2Bdeb12u3?arch=amd64&distro=debian-12"
                     "&upstream=util-linux%402.38.1-5%2Bdeb12u3"]
    assert bsdutils["properties"] == [{"name": "aquasecurity:trivy:SrcName", "value": "util-linux"},
                                      {"name": "aquasecurity:trivy:SrcRelease", "value": "5+deb12u3"},
                                      {"name": "aquasecurity:trivy:SrcVersion", "value": "2.38.1"}]
    deps = {d["ref"]: set(d["dependsOn"]) for d in doc["dependencies"]}
    assert libc in deps["image:app@linux/arm64"] and "os:debian@12" in deps["image:app@linux/arm64"]
    assert deps["release"] == {"image:app@linux/amd64", "image:app@linux/arm64", "file:tool/amd64"}
    tool = comps["file:tool/amd64"]
    digest = hashlib.sha256(made["binary"].read_bytes()).hexdigest()
    assert tool["version"] == "2.0" and tool["hashes"] == [{"alg": "SHA-256", "content": digest}]
    assert tool["purl"] == f"pkg:generic/tool@2.0?arch=amd64&checksum=sha256:{digest}"
    assert doc["serialNumber"].startswith("urn:uuid:")


def test_same_inputs_same_bytes_and_a_delta_carries_it(made, keypair) -> None:  # type: ignore[no-untyped-def]
    first = made["result"]
    (made["tmp"] / "again").mkdir()
    again = build.build_bundle(made["model"], made["tmp"] / "again", image_sources=[f"oci:{made['layout']}"],
                               platforms=PLATFORMS, sign_key=keypair[0], files=[f"tool@2.0/amd64={made['binary']}"])
    assert again.path.read_bytes() == first.path.read_bytes()
    # from a docker-save archive the layers are the uncompressed tars: other digests, the same packages
    (made["tmp"] / "docker").mkdir()
    other = build.build_bundle(made["model"], made["tmp"] / "docker", image_sources=[f"archive:{made['archive']}"],
                               platforms=PLATFORMS, sign_key=None, files=[f"tool@2.0/amd64={made['binary']}"])
    names = lambda p: {c["bom-ref"] for c in json.loads(_sbom_of(p)[1])["components"]  # noqa: E731
                       if c["bom-ref"].startswith("pkg:")}
    assert names(other.path) == names(first.path)
    # a delta of 1.0.1 (same image) against 1.0.0 still carries its SBOM, which lists every image
    (made["tmp"] / "delta").mkdir()
    delta = build.build_bundle(write_model(made["tmp"], "1.0.1"), made["tmp"] / "delta",
                               image_sources=[f"oci:{made['layout']}"], platforms=PLATFORMS, sign_key=keypair[0],
                               base=first.path)
    desc, data, manifest = _sbom_of(delta.path)
    assert desc["bundled"] and [b["usedBy"] for b in manifest["blobs"] if b["bundled"]] == [["model"], ["sbom"]]
    assert {"image:app@linux/amd64", "image:app@linux/arm64"} <= {c["bom-ref"] for c in json.loads(data)["components"]}


def _counting_scans(monkeypatch) -> list[str]:  # type: ignore[no-untyped-def]
    """The digests of the layers the builder reads for the SBOM, in order."""
    reads: list[str] = []
    real = sbom._scan_blob

    def counted(layer: img.Blob, what: str) -> sbom.LayerScan:
        reads.append(layer.digest)
        return real(layer, what)
    monkeypatch.setattr(sbom, "_scan_blob", counted)
    return reads


def test_layer_scans_are_kept_across_builds(made, keypair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    reads = _counting_scans(monkeypatch)
    cache = made["tmp"] / "scans"
    entries = cache / f"v{sbom.SCAN_VERSION}"

    def build_into(name: str) -> build.BuildResult:
        (made["tmp"] / name).mkdir()
        return build.build_bundle(made["model"], made["tmp"] / name, image_sources=[f"oci:{made['layout']}"],
                                  platforms=PLATFORMS, sign_key=keypair[0],
                                  files=[f"tool@2.0/amd64={made['binary']}"], scan_cache=cache)
    first = build_into("one")
    assert len(reads) == 4  # two layers a platform
    assert sorted(p.name for p in entries.iterdir()) == sorted(d.split(":")[1] + ".json" for d in reads)
    assert first.path.read_bytes() == made["result"].path.read_bytes()  # the bundle a build without cache made
    reads.clear()
    assert build_into("two").path.read_bytes() == first.path.read_bytes() and reads == []
    # an entry that cannot be read is a miss: that layer alone is read again, to the same bundle
    damaged = sorted(entries.iterdir())[0]
    damaged.write_text('{"whiteouts": [], "opaque": [], "files": {"var/lib/dpkg/status": "not base64!"}}')
    assert build_into("three").path.read_bytes() == first.path.read_bytes()
    assert [d.split(":")[1] + ".json" for d in reads] == [damaged.name]
    assert sbom.LayerScanCache(cache).get("sha256:" + damaged.stem) is not None  # written again, whole


def test_a_layer_scan_is_kept_only_once_the_build_confirmed_its_digest(tmp_path: Path, keypair,
                                                                        monkeypatch) -> None:  # type: ignore[no-untyped-def]
    reads = _counting_scans(monkeypatch)
    layout = write_oci_layout(tmp_path / "oci", images())
    base = hashlib.sha256(base_layer("amd64")).hexdigest()
    blob_file = layout / "blobs" / "sha256" / base
    good = blob_file.read_bytes()
    # a byte of /bin/sh's content flipped: the layer still reads as a tar, but is not the layer of its digest
    blob_file.write_bytes(good.replace(b"#!shell", b"#!Shell"))
    cache = tmp_path / "scans"
    model = write_model(tmp_path)
    for name in ("bad", "good"):
        (tmp_path / name).mkdir()
    with pytest.raises(build.BuildError, match=f"sha256:{base} .* hashes to"):
        build.build_bundle(model, tmp_path / "bad", image_sources=[f"oci:{layout}"], platforms=PLATFORMS,
                           sign_key=keypair[0], scan_cache=cache)
    assert f"sha256:{base}" in reads and not (cache / f"v{sbom.SCAN_VERSION}").exists()
    blob_file.write_bytes(good)
    reads.clear()
    build.build_bundle(model, tmp_path / "good", image_sources=[f"oci:{layout}"], platforms=PLATFORMS,
                       sign_key=keypair[0], scan_cache=cache)
    assert f"sha256:{base}" in reads  # read again from the repaired source, not taken from the failed build


def test_sbom_command_verifies_first_and_writes_the_exact_blob(made, keypair, other_keypair, capsys) -> None:  # type: ignore[no-untyped-def]
    path, out = made["result"].path, made["tmp"] / "sbom.cdx.json"
    assert cli.main(["sbom", str(path), "--pub", str(keypair[1]), "-o", str(out)]) == 0
    desc, data, _ = _sbom_of(path)
    assert out.read_bytes() == data and "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest() == desc["digest"]
    capsys.readouterr()
    assert cli.main(["sbom", str(path), "--integrity-only"]) == 0
    assert capsys.readouterr().out.encode() == data
    (made["tmp"] / "split").mkdir()  # a split bundle, from its parts.json
    split = build.build_bundle(made["model"], made["tmp"] / "split", image_sources=[f"oci:{made['layout']}"],
                               platforms=PLATFORMS, sign_key=keypair[0], files=[f"tool@2.0/amd64={made['binary']}"],
                               volume_size=4096)
    assert split.parts > 2 and cli.main(["sbom", str(split.path), "--pub", str(keypair[1]), "-o", str(out)]) == 0
    assert out.read_bytes() == data
    assert cli.main(["sbom", str(path), "--pub", str(other_keypair[1]), "-o", str(made["tmp"] / "x.json")]) == 1
    assert "not one of the trusted keys" in capsys.readouterr().err and not (made["tmp"] / "x.json").exists()
    assert cli.main(["sbom", str(path)]) == 2  # neither --pub nor --integrity-only
    assert cli.main(["inspect", str(path)]) == 0
    assert "sbom:       CycloneDX JSON" in capsys.readouterr().out


def test_manifest_refuses_a_second_or_an_omitted_sbom(made) -> None:  # type: ignore[no-untyped-def]
    manifest = bundle_format.read_head(str(made["result"].path)).manifest
    twice = json.loads(json.dumps(manifest))
    twice["blobs"][2]["usedBy"] = ["sbom"]
    with pytest.raises(BundleError, match="a release has one SBOM"):
        bundle_format.validate_manifest(twice)
    omitted = json.loads(json.dumps(manifest))
    omitted["blobs"][1]["bundled"] = False
    omitted["blobs"][1].pop("stored", None)
    omitted["delta"] = {"have": {"digest": "sha256:" + "0" * 64, "file": "h.json", "blobs": 1}}
    with pytest.raises(BundleError, match="the SBOM must be bundled"):
        bundle_format.validate_manifest(omitted)


def test_site_import_publishes_it_beside_the_release_and_status_names_it(made, keypair) -> None:  # type: ignore[no-untyped-def]
    from offline_delivery_core.bundle.ed25519 import load_public_key_files

    repo = SiteRepo(str(made["tmp"] / "repo"))
    import_bundle(repo, str(made["result"].path), load_public_key_files([str(keypair[1])]))
    desc, data, _ = _sbom_of(made["result"].path)
    assert (Path(repo.root) / "releases" / "sbomdemo" / "1.0.0" / SBOM_FILE).read_bytes() == data
    assert repo.find_release("sbomdemo", "1.0.0")["sbom"] == desc["digest"]
    doc = build_status(repo.root, "north", {}, "2026-12-06T00:00:00Z")
    assert doc["releases"][0]["sbom"] == desc["digest"]


def test_an_old_bundle_without_sbom_verifies_imports_and_says_so(made, keypair, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from offline_delivery_core.bundle.ed25519 import load_public_key_files

    # what bundle-builder wrote before SBOMs: the same build without the SBOM blob
    monkeypatch.setattr(build, "_plan_sbom", lambda *args: img.small_blob(b"not planned", "x"))
    (made["tmp"] / "old").mkdir()
    old = build.build_bundle(made["model"], made["tmp"] / "old", image_sources=[f"oci:{made['layout']}"],
                             platforms=PLATFORMS, sign_key=keypair[0])
    manifest = bundle_format.read_head(str(old.path)).manifest
    assert bundle_format.sbom_descriptor(manifest) is None and manifest["blobs"][1]["usedBy"] != ["sbom"]
    repo = SiteRepo(str(made["tmp"] / "repo"))
    assert import_bundle(repo, str(old.path), load_public_key_files([str(keypair[1])])).changed
    assert not (Path(repo.root) / "releases" / "sbomdemo" / "1.0.0" / SBOM_FILE).exists()
    assert "sbom" not in repo.find_release("sbomdemo", "1.0.0")
    assert "sbom" not in build_status(repo.root, "north", {}, "2026-12-06T00:00:00Z")["releases"][0]
    assert cli.main(["sbom", str(old.path), "--pub", str(keypair[1])]) == 1
    assert "carries no SBOM" in capsys.readouterr().err
    assert cli.main(["inspect", str(old.path)]) == 0
    assert "sbom:       none" in capsys.readouterr().out


def test_carried_debian_packages_merge_with_image_packages_by_purl() -> None:
    builder = sbom.SbomBuilder("x", "1", {"name": "bundle-builder", "version": "t"})
    builder.add_image(sbom.ImageInput("app", "sbom/app:1.0.0", "linux/amd64", "sha256:" + "1" * 64,
                                      [blob(base_layer("amd64"))]))
    digest = "sha256:" + "a" * 64
    section = {"debian-12/amd64": {"distro": "debian-12", "arch": "amd64", "profiles": ["base"], "index": "x",
                                   "packages": [{"package": "libc6", "version": "2.36-9+deb12u4",
                                                 "architecture": "amd64", "filename": "libc6_2.36-9+deb12u4_amd64.deb",
                                                 "digest": digest, "size": 1, "profiles": ["base"]}]}}
    index = b"Package: libc6\nVersion: 2.36-9+deb12u4\nArchitecture: amd64\nSource: glibc\nFilename: ./x.deb\n"
    builder.add_host_packages(section, {"debian-12/amd64": index})
    doc = builder.document()
    libc = [c for c in doc["components"] if c["name"] == "libc6"]
    assert len(libc) == 1 and libc[0]["hashes"] == [{"alg": "SHA-256", "content": "a" * 64}]
    assert {"name": "offline-delivery:carried-for", "value": "debian-12/amd64"} in libc[0]["properties"]
    deps = {d["ref"]: d["dependsOn"] for d in doc["dependencies"]}
    assert libc[0]["bom-ref"] in deps["release"] and libc[0]["bom-ref"] in deps["image:app@linux/amd64"]
    assert JsonStrictValidator(SchemaVersion.V1_5).validate_str(json.dumps(doc)) is None
    assert builder.to_bytes() == builder.to_bytes()

