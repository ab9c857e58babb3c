"""Testinfra checks of the converged repo host: signed apt repository served by nginx, site key kept
private, registry holding the release's image, units restarting on failure."""
import json
import os

import testinfra.utils.ansible_runner

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(
    os.environ["MOLECULE_INVENTORY_FILE"]).get_hosts("all")

APT = "/srv/offline-delivery/www/apt/debian-12"


def test_inrelease_served_and_signed_by_the_site_key(host):
    got = host.run("python3 -c \"import urllib.request as u; "
                   "open('/tmp/InRelease','wb').write(u.urlopen('http://127.0.0.1:8080/apt/debian-12/InRelease').read()); "
                   "open('/tmp/site.gpg','wb').write(u.urlopen('http://127.0.0.1:8080/keys/offline-delivery-archive.gpg').read())\"")
    assert got.rc == 0, got.stderr
    check = host.run("gpgv --keyring /tmp/site.gpg --output - /tmp/InRelease")
    assert check.rc == 0, check.stderr
    assert check.stdout == host.file(f"{APT}/Release").content_string


def test_packages_are_links_to_the_blobs(host):
    listing = host.run(f"find {APT} -name '*.deb' -links 1")
    assert listing.rc == 0 and listing.stdout == "", "every .deb should be a hard link to its blob"
    assert "Package: docker-registry" in host.file(f"{APT}/Packages").content_string


def test_private_key_stays_private(host):
    home = host.file("/etc/offline-delivery/apt-signing")
    assert home.is_directory and home.mode == 0o700 and home.user == "root"
    keys = host.run("stat -c %a /etc/offline-delivery/apt-signing/private-keys-v1.d/*.key").stdout.split()
    assert keys and set(keys) == {"600"}


def test_registry_has_the_image(host):
    out = host.run("python3 -c \"import urllib.request as u; "
                   "print(u.urlopen('http://127.0.0.1:5000/v2/mini/web/tags/list').read().decode())\"")
    assert out.rc == 0, out.stderr
    assert json.loads(out.stdout)["tags"] == ["1.0.0"]


def test_units_enabled_and_restart_on_failure(host):
    for unit in ("nginx", "docker-registry"):
        svc = host.service(unit)
        assert svc.is_running and svc.is_enabled
        assert host.run(f"systemctl show -p Restart {unit}").stdout.strip() == "Restart=on-failure"
