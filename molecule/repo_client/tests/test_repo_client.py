"""repo_client on a world host: the site repo is apt's only source, trusted by the site key, no Recommends."""
import hashlib
import os
from pathlib import Path

import testinfra.utils.ansible_runner

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(
    os.environ["MOLECULE_INVENTORY_FILE"]).get_hosts("all")

KEY = Path(__file__).resolve().parents[1] / "files" / "site-key.gpg"
SOURCE = ("deb [signed-by=/etc/apt/keyrings/offline-delivery.gpg] "
          "http://192.0.2.10:8080/apt/debian-12/ ./")


def test_source_line_points_at_the_site_repo(host):
    source = host.file("/etc/apt/sources.list.d/offline-delivery.list")
    assert source.mode == 0o644
    lines = [ln for ln in source.content_string.splitlines() if ln and not ln.startswith("#")]
    assert lines == [SOURCE]


def test_key_is_the_one_given_on_the_controller(host):
    key = host.file("/etc/apt/keyrings/offline-delivery.gpg")
    assert key.mode == 0o644 and key.user == "root"
    assert key.sha256sum == hashlib.sha256(KEY.read_bytes()).hexdigest()


def test_other_sources_renamed_not_deleted(host):
    for path in ("/etc/apt/sources.list", "/etc/apt/sources.list.d/vendor.sources",
                 "/etc/apt/sources.list.d/extra.list"):
        assert not host.file(path).exists, f"{path} still active"
        assert host.file(path + ".offline-delivery.disabled").is_file, f"{path} was not kept aside"


def test_apt_would_fetch_only_from_the_site_repo(host):
    # --print-uris lists what `apt-get update` would fetch, without fetching.
    uris = host.check_output("apt-get update --print-uris")
    fetched = [ln.split("'")[1] for ln in uris.splitlines() if ln.startswith("'")]
    assert fetched, uris
    assert all(u.startswith("http://192.0.2.10:8080/apt/debian-12/") for u in fetched), fetched


def test_recommends_and_suggests_off(host):
    dump = host.check_output("apt-config dump")
    assert 'APT::Install-Recommends "false";' in dump
    assert 'APT::Install-Suggests "false";' in dump
