"""TLS with a CA made on site (`offline_delivery_tls: true`, docs/site-repo.md "TLS") on an air-gapped site.

One site for the module (`e2e-tls`, env OD_E2E_SITE_TLS): a repo host, a compose host (node1) and a systemd host
(node2), both amd64. With the option in the site's inventory (group_vars/all), the user's playbooks as they are:
import shop 1.0.0 (the repo host makes its CA, nginx serves HTTPS), runtime (apt, Docker and the site CA on the
targets), install shop 1.0.0 (node1 pulls through dockerd, node2 through the systemd target's registry client).
Then: the CA key stays 0600 on the repo host and is made once; plain HTTP is refused on every port; without the
site CA a pull is refused; apt, Docker and the systemd target reached the repo host over HTTPS only.
Cached shop bundles are reused (tests/e2e/media.py); about 4 minutes on a quiet 2-core machine.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.e2e.conftest import require_world, running_site
from tests.e2e.media import carry, recap
from tests.world.site import HostSpec, Site
from tests.world.util import Result

pytestmark = pytest.mark.world

HOSTS = (
    HostSpec("repo", "amd64", ("offline_repo",)),
    HostSpec("node1", "amd64", ("compose_hosts",)),
    HostSpec("node2", "amd64", ("systemd_hosts",)),
)
PLAY_TIMEOUT = 1500
CA = "/etc/offline-delivery/tls/site-ca.crt"
CA_KEY = "/etc/offline-delivery/tls/private/site-ca.key"
IMAGE = "shop/api:1.0.0"


def ok(res: Result, what: str) -> Result:
    assert res.rc == 0, f"{what} failed (rc {res.rc}):\n{res.output[-6000:]}"
    return res


def on(site: Site, host: str, script: str, timeout: float = 120) -> Result:
    return site.exec(host, ["bash", "-c", script], timeout=timeout)


def fetch(site: Site, host: str, url: str, cafile: str | None) -> str:
    """What a GET of ``url`` from ``host`` gives: ``<status>`` or ``error: <reason>`` (python3, no curl there)."""
    script = ("import ssl,sys,urllib.request as u,urllib.error as e\n"
              "ctx=ssl.create_default_context(cafile=sys.argv[2] or None)\n"
              "try:\n print(u.urlopen(sys.argv[1],timeout=20,context=ctx).status)\n"
              "except e.HTTPError as x:\n print(x.code)\n"
              "except Exception as x:\n print('error:',x)\n")
    res = site.exec(host, ["python3", "-c", script, url, cafile or ""], timeout=60)
    assert res.rc == 0, res.output
    return res.stdout.strip()


@pytest.fixture(scope="module")
def site(shop_bundles: dict[str, Path]) -> Iterator[Site]:
    require_world(h.arch for h in HOSTS)
    yield from running_site(Site(os.environ.get("OD_E2E_SITE_TLS", "e2e-tls"), HOSTS))


@pytest.fixture(scope="module")
def done(site: Site, shop_bundles: dict[str, Path]) -> dict[str, Any]:
    option = site.state_dir / "group_vars" / "all" / "tls.yml"
    option.parent.mkdir(parents=True, exist_ok=True)
    option.write_text(yaml.safe_dump({"offline_delivery_tls": True}))
    carry(site, {"shop-1.0.0": shop_bundles["shop-1.0.0"], "vendor.pub": shop_bundles["vendor.pub"]})
    keys = json.dumps({"offline_delivery_vendor_keys_src": ["/srv/transfer/vendor.pub"]})
    imported = ok(site.jump(["ansible-playbook", "offline.delivery.import", "-e",
                             "offline_delivery_bundle_src=/srv/transfer/shop-1.0.0", "-e", keys],
                            timeout=PLAY_TIMEOUT), "import shop 1.0.0")
    ca_after_import = ok(on(site, "repo", f"sha256sum {CA} {CA_KEY}"), "hash the CA").stdout
    runtime = ok(site.jump(["ansible-playbook", "offline.delivery.runtime"], timeout=PLAY_TIMEOUT), "runtime")
    installed = ok(site.jump(["ansible-playbook", "offline.delivery.install", "-e", "app_name=shop",
                              "-e", "app_version=1.0.0"], timeout=PLAY_TIMEOUT), "install shop 1.0.0")
    rerun = ok(site.jump(["ansible-playbook", "offline.delivery.runtime"], timeout=PLAY_TIMEOUT), "runtime again")
    repo_ip = next(h["ip"] for h in site.info()["hosts"] if h["name"] == "repo")
    ips = {h["name"]: h["ip"] for h in site.info()["hosts"]}
    return {"import": imported, "runtime": runtime, "install": installed, "rerun": rerun, "repo_ip": repo_ip,
            "ips": ips, "ca_after_import": ca_after_import}


def test_the_ca_is_made_on_the_repo_host_once_and_its_key_stays_there(site: Site, done: dict[str, Any]) -> None:
    modes = ok(on(site, "repo", f"stat -c '%a %U %n' {CA} {CA_KEY} $(dirname {CA_KEY})"), "stat").stdout.split("\n")
    assert modes[:3] == [f"644 root {CA}", f"600 root {CA_KEY}", f"700 root {os.path.dirname(CA_KEY)}"], modes
    again = ok(on(site, "repo", f"sha256sum {CA} {CA_KEY}"), "hash the CA").stdout
    assert again == done["ca_after_import"], "runtime made another CA"
    for host in ("node1", "node2"):
        assert on(site, host, f"test -e {os.path.dirname(CA_KEY)}").rc != 0, f"{host} has the CA's private dir"
        same = site.exec(host, ["sha256sum", CA]).stdout.split()[0]
        assert same == again.split()[0], f"{host}: not the site CA"
    names = ok(on(site, "repo", "python3 -c \"from cryptography import x509; c=x509.load_pem_x509_certificate("
                                "open('/etc/offline-delivery/tls/server.crt','rb').read()); "
                                "print([str(n.value) for n in c.extensions.get_extension_for_class("
                                "x509.SubjectAlternativeName).value])\""), "read the SANs").stdout
    assert done["repo_ip"] in names and "'repo'" in names, names


def test_a_second_runtime_run_changes_nothing(done: dict[str, Any]) -> None:
    for host in ("repo", "node1", "node2"):
        assert recap(done["rerun"], host)["changed"] == 0, f"{host}:\n{done['rerun'].stdout[-4000:]}"


def test_plain_http_is_refused_and_https_needs_the_site_ca(site: Site, done: dict[str, Any]) -> None:
    repo = done["repo_ip"]
    for url in (f"http://{repo}:5000/v2/", f"http://{repo}:8080/keys/offline-delivery-archive.gpg"):
        assert fetch(site, "node2", url, None) == "400", f"{url}: nginx should answer plain HTTP with 400"
    for url in (f"https://{repo}:5000/v2/", f"https://{repo}:8080/keys/offline-delivery-archive.gpg"):
        assert fetch(site, "node2", url, CA) == "200", url
        refused = fetch(site, "node2", url, None)
        assert refused.startswith("error:") and "CERTIFICATE_VERIFY_FAILED" in refused, refused


def test_apt_uses_https_and_only_the_site_ca(site: Site, done: dict[str, Any]) -> None:
    repo = done["repo_ip"]
    for host in ("node1", "node2"):
        res = ok(on(site, host, "apt-get update --print-uris; cat /etc/apt/apt.conf.d/90offline-delivery-tls"),
                 f"{host}: apt")
        uris = re.findall(r"^'([^']+)'", res.stdout, flags=re.M)
        assert uris and all(u.startswith(f"https://{repo}:8080/apt/debian-12/") for u in uris), uris
        assert f'Acquire::https::{repo}::CAInfo "{CA}";' in res.stdout
        ok(on(site, host, "apt-get update", timeout=180), f"{host}: apt-get update over HTTPS")


def test_docker_trusts_the_site_ca_and_lists_no_insecure_registry(site: Site, done: dict[str, Any]) -> None:
    repo = done["repo_ip"]
    daemon = json.loads(ok(on(site, "node1", "cat /etc/docker/daemon.json"), "daemon.json").stdout)
    assert "insecure-registries" not in daemon and daemon["registry-mirrors"] == [f"https://{repo}:5000"], daemon
    certs = f"/etc/docker/certs.d/{repo}:5000"
    ok(on(site, "node1", f"cmp {certs}/ca.crt {CA}"), "the registry's CA is the site CA")
    ok(on(site, "node1", f"docker pull {repo}:5000/{IMAGE}", timeout=300), "pull over HTTPS")
    ok(on(site, "node1", f"docker pull {IMAGE}", timeout=300), "pull through the HTTPS mirror")
    # without the site CA dockerd refuses the registry (and never falls back to plain HTTP)
    refused = on(site, "node1", f"mv {certs} /root/certs.aside && docker rmi {repo}:5000/{IMAGE} >/dev/null; "
                                f"docker pull {repo}:5000/{IMAGE}; rc=$?; mv /root/certs.aside {certs}; exit $rc",
                 timeout=300)
    assert refused.rc != 0 and re.search(r"x509|certificate", refused.output), refused.output


def test_the_shop_was_pulled_over_https_on_both_targets(site: Site, done: dict[str, Any]) -> None:
    for host in ("node1", "node2"):
        assert recap(done["install"], host)["failed"] == 0
        res = site.exec(host, ["python3", "-c", "import urllib.request as u;"
                               "print(u.urlopen('http://127.0.0.1:8080/api/orders',timeout=20).status)"], timeout=60)
        assert res.stdout.strip() == "200", f"{host}: the shop does not answer: {res.output}"
    # port 5000 speaks only TLS: every manifest the registry served to a target went over HTTPS
    log = ok(on(site, "repo", "cat /var/log/nginx/access.log"), "nginx log").stdout
    for host in ("node1", "node2"):
        ip = re.escape(done["ips"][host])
        assert re.search(rf"^{ip} .*\"GET /v2/shop/api/manifests/sha256:[0-9a-f]{{64}} HTTP/1.1\" 200 ", log,
                         flags=re.M), f"{host} pulled no shop manifest from the registry:\n{log[-3000:]}"
    units = ok(on(site, "node2", "systemctl is-active od-shop-api od-shop-gateway"), "units").stdout.split()
    assert units == ["active", "active"]
