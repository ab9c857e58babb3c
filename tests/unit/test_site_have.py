"""Site have-list (plugins/module_utils/site/have.py): the pure-Python signer agrees with ``cryptography``,
the export is deterministic and idempotent, a tampered or foreign list is refused, and a bundle built with
``--have`` against it carries only what the site lacks."""

from __future__ import annotations

import json
import re
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundle_builder import build
from offline_delivery_core.bundle import ed25519
from offline_delivery_core.site import have as site_have
from offline_delivery_core.bundle.format import HAVE_MEDIA_TYPE, read_head
from tests.unit.test_files_site import Vendor


def test_sign_matches_cryptography() -> None:
    for seed in (bytes(32), bytes(range(32)), os.urandom(32)):
        key = Ed25519PrivateKey.from_private_bytes(seed)
        pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert site_have.public_from_seed(seed) == pub
        for msg in (b"", b"have", os.urandom(300)):
            sig = site_have.sign(seed, msg)
            assert sig == key.sign(msg)  # Ed25519 is deterministic: same bytes
            assert ed25519.verify(pub, msg, sig)


def test_key_is_pkcs8_0600_and_cryptography_reads_it(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    seed, created = site_have.load_or_create_key(str(key_dir))
    assert created and seed is not None
    key_file = key_dir / site_have.KEY_NAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    loaded = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(loaded, Ed25519PrivateKey)
    assert loaded.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption()) == seed
    pub = ed25519.load_public_key_pem((key_dir / site_have.PUB_NAME).read_text())
    assert pub == site_have.public_from_seed(seed)
    assert site_have.load_or_create_key(str(key_dir)) == (seed, False)
    key_file.chmod(0o640)
    with pytest.raises(site_have.HaveError, match="accessible by group/others.*chmod 600"):
        site_have.load_or_create_key(str(key_dir))


@pytest.fixture
def site(sample_world, keypair, tmp_path: Path) -> Vendor:  # type: ignore[no-untyped-def]
    v = Vendor(sample_world, keypair, tmp_path)
    v.release("1.0.0", [])
    return v


def test_export_check_write_unchanged(site: Vendor, tmp_path: Path) -> None:
    dest, keys = tmp_path / "out" / "north.have.json", tmp_path / "keys"
    res = site_have.export_have(str(site.repo), "north", str(dest), str(keys), check_mode=True)
    assert res.changed and res.key_created and not dest.exists() and not keys.exists()

    res = site_have.export_have(str(site.repo), "north", str(dest), str(keys))
    assert res.changed and res.key_created and res.missing == 0
    doc = json.loads(dest.read_bytes())
    manifest = json.loads((site.repo / "releases" / "demo" / "1.0.0" / "manifest.json").read_bytes())
    assert doc["mediaType"] == HAVE_MEDIA_TYPE and doc["site"] == "north"
    assert doc["blobs"] == sorted(b["digest"] for b in manifest["blobs"])
    assert [(r["name"], r["version"]) for r in doc["releases"]] == [("demo", "1.0.0")]
    pub = ed25519.load_public_key_pem((tmp_path / "out" / "north.have.pub").read_text())
    assert site_have.verify_have(dest.read_bytes(), [pub])["site"] == "north"

    before = dest.read_bytes()
    for check in (True, False):
        res = site_have.export_have(str(site.repo), "north", str(dest), str(keys), check_mode=check)
        assert not res.changed and dest.read_bytes() == before


def test_missing_blob_is_not_listed(site: Vendor, tmp_path: Path) -> None:
    manifest = json.loads((site.repo / "releases" / "demo" / "1.0.0" / "manifest.json").read_bytes())
    gone = manifest["blobs"][0]["digest"]
    os.unlink(site.repo / "blobs" / "sha256" / gone.split(":")[1])
    doc, missing = site_have.build_have(str(site.repo), "north")
    assert missing == 1 and gone not in doc["blobs"]


def test_verify_refuses_tampered_unsigned_and_foreign(site: Vendor, tmp_path: Path) -> None:
    dest = tmp_path / "north.have.json"
    site_have.export_have(str(site.repo), "north", str(dest), str(tmp_path / "keys"))
    pub = ed25519.load_public_key_pem((tmp_path / "north.have.pub").read_text())
    doc = json.loads(dest.read_bytes())

    tampered = dict(doc, blobs=doc["blobs"] + ["sha256:" + "0" * 64])
    with pytest.raises(site_have.HaveError, match="modified after the site signed it"):
        site_have.verify_have(json.dumps(tampered).encode(), [pub], "north.have.json")
    unsigned = {k: v for k, v in doc.items() if k != "signature"}
    with pytest.raises(site_have.HaveError, match="carries no site signature"):
        site_have.verify_have(json.dumps(unsigned).encode(), [pub])
    other = site_have.public_from_seed(bytes(32))
    with pytest.raises(site_have.HaveError, match="not the site key given"):
        site_have.verify_have(dest.read_bytes(), [other])


def test_bad_site_name_and_no_repo(tmp_path: Path) -> None:
    with pytest.raises(site_have.HaveError, match="site name"):
        site_have.build_have(str(tmp_path), "../x")
    with pytest.raises(site_have.HaveError, match="is not a site repository"):
        site_have.build_have(str(tmp_path / "none"), "north")


def test_build_with_have_carries_only_new_blobs(site: Vendor, sample_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dest = tmp_path / "north.have.json"
    site_have.export_have(str(site.repo), "north", str(dest), str(tmp_path / "keys"))
    have = set(json.loads(dest.read_bytes())["blobs"])
    out = tmp_path / "out-delta"
    out.mkdir()
    model = sample_world.write_model("app-1.1.0.yml", version="1.1.0")
    result = build.build_bundle(model, out, image_sources=sample_world.archives, platforms=["linux/amd64"],
                                sign_key=site.key, have=dest)
    manifest = read_head(str(result.path)).manifest
    bundled = {b["digest"] for b in manifest["blobs"] if b["bundled"]}
    assert bundled == {b["digest"] for b in manifest["blobs"]} - have
    assert bundled and len(bundled) < len(manifest["blobs"])


def test_cli_build_have_pub_checks_the_site_signature(site: Vendor, sample_world, keypair, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                     capsys) -> None:
    from bundle_builder import cli

    dest = tmp_path / "north.have.json"
    site_have.export_have(str(site.repo), "north", str(dest), str(tmp_path / "keys"))
    pub = tmp_path / "north.have.pub"
    model = sample_world.write_model("app-1.1.0.yml", version="1.1.0")
    images = [a for src in sample_world.archives for a in ("--images-from", src)]
    base = ["build", str(model), *images, "--sign-key", str(keypair[0]), "--have", str(dest)]

    other = tmp_path / "other.have.pub"
    other.write_bytes(site_have.public_key_pem(site_have.public_from_seed(bytes(32))))
    assert cli.main([*base, "-o", str(tmp_path / "o1"), "--have-pub", str(other)]) != 0
    assert "not the site key given" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists()

    doc = json.loads(dest.read_bytes())
    forged = tmp_path / "forged.have.json"
    forged.write_text(json.dumps(dict(doc, blobs=doc["blobs"][1:])))
    assert cli.main([*base[:-1], str(forged), "-o", str(tmp_path / "o2"), "--have-pub", str(pub)]) != 0
    assert "modified after the site signed it" in capsys.readouterr().err

    assert cli.main([*base, "-o", str(tmp_path / "o3"), "--have-pub", str(pub)]) == 0
    assert list((tmp_path / "o3").glob("*.bundle"))


def test_one_have_file_reader_for_signed_and_plain_lists() -> None:
    """parse_have reads what build --have and bundle_export take (a hand-made list too); verify_have adds the
    signature and makes the same content checks (issue #15: build.py had a reader of its own)."""
    digest = "sha256:" + "a" * 64
    assert site_have.parse_have(b'{"blobs": []}')["blobs"] == []
    assert site_have.parse_have(json.dumps({"mediaType": HAVE_MEDIA_TYPE, "blobs": [digest], "site": "n"}).encode(),
                                "x") == {"mediaType": HAVE_MEDIA_TYPE, "blobs": [digest], "site": "n"}
    for data, message in ((b"[]", 'x: expected {"blobs"'), (b"nope", "x is not JSON"),
                          (b'{"blobs": ["sha256:abc"]}', "x: blobs[0] = 'sha256:abc' is not a"),
                          (b'{"blobs": [], "mediaType": "text/plain"}', "x: mediaType 'text/plain' is not")):
        with pytest.raises(site_have.HaveError, match=re.escape(message)):
            site_have.parse_have(data, "x")
    seed = bytes(range(32))
    signed = site_have.signed_bytes({"mediaType": HAVE_MEDIA_TYPE, "site": "n", "blobs": [digest, "sha256:abc"]}, seed)
    with pytest.raises(site_have.HaveError, match=re.escape("x: blobs[1] = 'sha256:abc' is not a")):
        site_have.verify_have(signed, [site_have.public_from_seed(seed)], "x")
    signed = site_have.signed_bytes({"mediaType": HAVE_MEDIA_TYPE, "site": "n", "blobs": [digest]}, bytes(32))
    assert site_have.parse_have(signed)["signature"]["alg"] == "ed25519"  # read, not checked


def test_build_checks_the_have_signature_itself(site: Vendor, sample_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """have_pub is build_bundle's, so the CLI and the bundle_export module refuse alike, before any image is read."""
    dest = tmp_path / "north.have.json"
    site_have.export_have(str(site.repo), "north", str(dest), str(tmp_path / "keys"))
    pinned = ed25519.load_public_key_pem((tmp_path / "north.have.pub").read_text())
    other = site_have.public_from_seed(bytes(32))
    model = sample_world.write_model("app-1.1.0.yml", version="1.1.0")
    out = tmp_path / "out"
    out.mkdir()
    nothing = ["oci:" + str(tmp_path / "no-such-layout")]  # reading an image would fail otherwise
    with pytest.raises(build.BuildError, match=f"have-file {re.escape(str(dest))} is signed by key .*not the site key given"):
        build.build_bundle(model, out, image_sources=nothing, platforms=["linux/amd64"], sign_key=site.key,
                           have=dest, have_pub=[other])
    with pytest.raises(build.BuildError, match="give --have too"):
        build.build_bundle(model, out, image_sources=nothing, platforms=["linux/amd64"], sign_key=site.key,
                           have_pub=[pinned])
    plain = tmp_path / "plain.have.json"
    plain.write_text(json.dumps({"mediaType": HAVE_MEDIA_TYPE, "blobs": json.loads(dest.read_bytes())["blobs"]}))
    with pytest.raises(build.BuildError, match="carries no site signature"):
        build.build_bundle(model, out, image_sources=nothing, platforms=["linux/amd64"], sign_key=site.key,
                           have=plain, have_pub=[pinned])
    assert not list(out.iterdir())
    result = build.build_bundle(model, out, image_sources=sample_world.archives, platforms=["linux/amd64"],
                                sign_key=site.key, have=dest, have_pub=[pinned])
    assert read_head(str(result.path)).manifest["delta"]["have"]["file"] == "north.have.json"
    # without have_pub a plain list still works (hand-made have-files keep working)
    build.build_bundle(model, tmp_path, image_sources=sample_world.archives, platforms=["linux/amd64"],
                       sign_key=site.key, have=plain)


# --------------------------------------------------------------------------------------------------------
# offline-delivery (offline_delivery_cli/command.py): argument handling; a real run is in tests/e2e/test_have.py


def _fleet_vars(tmp_path: Path, *argv: str) -> dict:
    from offline_delivery_cli import command
    return command.playbook_vars(command.parse_args(list(argv)), tmp_path)


def test_fleet_arguments_become_playbook_vars(tmp_path: Path) -> None:
    assert _fleet_vars(tmp_path, "upgrade", "-i", "inv", "--app", "shop", "--version", "1.1.0",
                       "-e", "app_snapshot=true", "-e", "note=a b") == {
        "app_name": "shop", "app_version": "1.1.0", "app_snapshot": True, "note": "a b"}
    assert _fleet_vars(tmp_path, "rollback", "-i", "inv", "--app", "shop", "--version", "1.0.0") == {
        "app_name": "shop", "app_rollback_version": "1.0.0"}
    assert _fleet_vars(tmp_path, "import", "-i", "inv", "--bundle", "usb/shop", "--vendor-key", "usb/v.pub") == {
        "offline_delivery_bundle_src": str(tmp_path / "usb" / "shop"),
        "offline_delivery_vendor_keys_src": [str(tmp_path / "usb" / "v.pub")]}
    assert _fleet_vars(tmp_path, "status", "-i", "inv", "--app", "shop")["app_report_dir"] == \
        str(tmp_path / "offline-delivery-reports")
    assert _fleet_vars(tmp_path, "have", "-i", "inv", "--site", "north") == {
        "offline_delivery_site": "north", "offline_delivery_have_dest": str(tmp_path / "offline-delivery-have")}
    assert _fleet_vars(tmp_path, "sync", "-i", "inv", "--from", "http://hub:8080", "--app", "shop",
                       "--version", "1.1.0", "--bandwidth", "10M") == {
        "app_name": "shop", "app_version": "1.1.0", "offline_delivery_sync_from": "http://hub:8080",
        "offline_delivery_sync_bandwidth_limit": "10M"}
    assert _fleet_vars(tmp_path, "site_status", "-i", "inv") == {
        "offline_delivery_status_dest": str(tmp_path / "offline-delivery-status")}


@pytest.mark.parametrize("argv, message", [
    (["install", "-i", "inv"], "install needs --app NAME"),
    (["import", "-i", "inv", "--vendor-key", "v.pub"], "import needs --bundle PATH"),
    (["import", "-i", "inv", "--bundle", "b"], "import needs --vendor-key PUB"),
    (["status", "-i", "inv", "--app", "shop", "--version", "1"], "--version does not apply to status"),
    (["install", "-i", "inv", "--app", "shop", "--bundle", "b"], "--bundle does not apply to install"),
    (["install", "-i", "inv", "--app", "shop", "-e", "novalue"], "expected KEY=VALUE"),
    (["install", "-i", "inv", "--app", "shop", "-e", "a-b=1"], "expected KEY=VALUE"),
    (["sync", "-i", "inv", "--app", "shop", "--version", "1.1.0"], "sync needs --from URL"),
    (["sync", "-i", "inv", "--app", "shop", "--from", "http://hub:8080"], "sync needs --from URL"),
    (["install", "-i", "inv", "--app", "shop", "--from", "http://hub:8080"], "--from does not apply to install"),
    (["site_status", "-i", "inv", "--version", "1.0.0"], "--version does not apply to site_status"),
])
def test_fleet_refuses_bad_arguments(tmp_path: Path, argv: list[str], message: str) -> None:
    from offline_delivery_cli import command
    with pytest.raises(command.UsageError, match=re.escape(message)):
        _fleet_vars(tmp_path, *argv)


def test_fleet_main_exit_codes(tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from offline_delivery_cli import command
    from offline_delivery_common import exits
    monkeypatch.chdir(tmp_path)
    assert command.main(["status", "-i", "missing.yml", "--app", "shop"]) == exits.EXIT_USAGE
    assert f"inventory {tmp_path / 'missing.yml'} does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        command.main(["deploy", "-i", "inv"])
    assert exc.value.code == 2 and "invalid choice: 'deploy'" in capsys.readouterr().err


def test_fleet_summary_from_runner_stats() -> None:
    from offline_delivery_cli import command
    s = command.Summary.from_stats({"ok": {"repo": 5, "node1": 3}, "changed": {"repo": 2},
                                  "failures": {"node1": 1}, "dark": {}, "skipped": {"repo": 1}})
    assert s.failed_hosts() == ["node1"]
    lines = s.lines()
    assert lines[1].split() == ["node1", "FAILED", "3", "0", "1", "0", "0"]
    assert lines[2].split() == ["repo", "changed", "5", "2", "0", "0", "1"]
    assert command.Summary.from_stats(None).lines() == ["no host ran a task (check the inventory and --limit)"]


class _FakeRunner:
    def __init__(self, rc: int, status: str, stats: dict) -> None:
        self.rc, self.status, self.stats = rc, status, stats


def test_fleet_run_gives_each_run_its_own_dir_and_reports(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import ansible_runner

    from offline_delivery_cli import command
    calls: list[dict] = []

    def fake_run(**kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs)
        handler = kwargs["event_handler"]
        handler({"event": "playbook_on_play_start", "event_data": {"play": "Install"}})
        handler({"event": "playbook_on_task_start", "event_data": {"task": "Deploy"}})
        handler({"event": "runner_on_failed", "event_data": {"host": "node1", "res": {"msg": "health gate\nmore"}}})
        failed = len(calls) == 2
        return _FakeRunner(2 if failed else 0, "failed" if failed else "successful",
                           {"ok": {"node1": 2}, "changed": {}, "failures": {"node1": 1} if failed else {}})

    monkeypatch.setattr(ansible_runner, "run", fake_run)
    monkeypatch.setattr(command.os, "getpid", lambda: len(calls))  # two runs within one second: distinct names
    (tmp_path / "inv.yml").write_text("all: {}\n")
    lines: list[str] = []
    args = command.parse_args(["upgrade", "-i", "inv.yml", "--app", "shop", "--version", "1.1.0", "--check"])
    assert command.run(args, write=lines.append, cwd=tmp_path) == command.EXIT_OK
    args = command.parse_args(["install", "-i", "inv.yml", "--app", "shop"])
    assert command.run(args, write=lines.append, cwd=tmp_path) == command.EXIT_FAILED

    first, second = calls
    assert first["playbook"] == "offline.delivery.upgrade" and first["cmdline"] == "--check"
    assert first["extravars"] == {"app_name": "shop", "app_version": "1.1.0"}
    assert second["extravars"] == {"app_name": "shop"} and second["cmdline"] is None
    assert first["private_data_dir"] != second["private_data_dir"]
    assert Path(first["private_data_dir"]).parent == tmp_path / "offline-delivery-runs"
    assert first["inventory"] == str(tmp_path / "inv.yml")
    assert "== Install" in lines and "   Deploy" in lines and "   FAILED node1: health gate" in lines
    assert "upgrade done (check mode: nothing changed)" in lines
    assert any(ln.startswith("install FAILED (status failed, rc 2) on node1; details in ") for ln in lines)


def test_the_site_key_signs_with_cryptography_and_rfc8032_holds() -> None:
    """RFC 8032 section 7.1, test 1; and no module reaches into ed25519.py's private curve arithmetic to sign
    (the pure-Python code is the stdlib-only verifier, not a signer)."""
    import pathlib

    from offline_delivery_core.site import have as site_have
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    assert site_have.public_from_seed(seed).hex() == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    assert site_have.sign(seed, b"").hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")
    root = pathlib.Path(__file__).resolve().parents[2]
    users = [p.name for p in (root / "plugins" / "module_utils").rglob("*.py")
             if p.name != "ed25519.py" and "ed25519._" in p.read_text()]
    assert not users, f"private ed25519 functions used by {users}"
