"""Binaries carried in a bundle reach the site's hosts, and the k3s role installs from them, in an air-gapped
site: repo (offline_repo) + k3s1 (server, amd64) + k3s2 (agent, amd64) + k3sarm (agent, arm64).

A small bundle (one tiny image, the debian-12 base+repo closures for the repo host's tools) carries files built
with `--file`: `k3s@v1.30.2+k3s1/<arch>` and `k3s-airgap-images@v1.30.2+k3s1/<arch>` for amd64 and arm64. No
k3s binary can be obtained on this machine, so by default these are stand-ins made here (a shell script and a
tar per arch, different bytes per arch): enough to prove the file tree (served, sha256 matches, hard link to
the blob) and everything the role renders, fetches (per host architecture) and checks, with
`k3s_start=false`. Starting k3s runs only with a real binary: OD_K3S_BINARY=/path/to/k3s (amd64) and
OD_K3S_IMAGES=/path/to/k3s-airgap-images-amd64.tar.zst make the bundle carry those instead (amd64 hosts
only), and `test_k3s_cluster_runs_from_the_site` then starts the cluster; without them it is skipped,
naming why.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.conftest import require_world
from tests.e2e.media import bundle_builder, carry, recap
from tests.helpers.images import TestImage, rootfs_layer, write_oci_layout
from tests.world.site import HostSpec, Site
from tests.world.util import Result

pytestmark = pytest.mark.world

VERSION = "v1.30.2+k3s1"
NEWER = "v1.31.0+k3s1"
REPO_ROOT = "/srv/offline-delivery"
FILES_URL = "http://repo:8080/files/"
PLAY_TIMEOUT = 900
NO_BINARY = ("no k3s binary can be obtained on this machine; supply one with --file k3s/<arch>=PATH to run it "
             "(here: OD_K3S_BINARY=/path/to/k3s and OD_K3S_IMAGES=/path/to/k3s-airgap-images-amd64.tar.zst)")
APP = """\
apiVersion: offline.delivery/v1
kind: Application
name: k3sfiles
version: 1.0.0
components:
  web:
    image: k3sfiles/web:1.0.0
    ports: [{port: 8080}]
"""


def _real_k3s() -> tuple[Path, Path] | None:
    binary, images = os.environ.get("OD_K3S_BINARY"), os.environ.get("OD_K3S_IMAGES")
    if not binary:
        return None
    if not images:
        pytest.fail("OD_K3S_BINARY is set but OD_K3S_IMAGES is not: give the airgap images tarball too")
    return Path(binary), Path(images)


def _stand_ins(out: Path, arch: str, version: str = VERSION) -> tuple[Path, Path]:
    """Not k3s: a script that says so, and a tar holding one file. They travel and are checked like k3s would."""
    binary = out / f"k3s-stand-in-{version}-{arch}"
    binary.write_text(f"#!/bin/sh\necho 'stand-in for k3s {version} {arch} (offline.delivery e2e): not the real binary' "
                      ">&2\nexit 1\n")
    binary.chmod(0o755)
    images = out / f"airgap-stand-in-{version}-{arch}.tar"
    data = f"stand-in for the k3s airgap images, {version} {arch}\n".encode()
    with tarfile.open(images, "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("README")
        info.size, info.mtime = len(data), 0
        tar.addfile(info, io.BytesIO(data))
    return binary, images


def _site_hosts(real: bool) -> tuple[HostSpec, ...]:
    # A real k3s needs the kernel log device in its containers, and runs on amd64 only here (no arm64 binary
    # given, and qemu-user cannot run a kubelet); stand-ins never start, so they also cover an arm64 agent.
    extra = ("--device", "/dev/kmsg") if real and os.path.exists("/dev/kmsg") else ()
    hosts = (HostSpec("repo", "amd64", ("offline_repo",)),
             HostSpec("k3s1", "amd64", ("k3s",), extra),
             HostSpec("k3s2", "amd64", ("k3s",), extra))
    return hosts if real else hosts + (HostSpec("k3sarm", "arm64", ("k3s",)),)


def _agents(site: Site) -> list[str]:
    return [h.name for h in site.hosts if "k3s" in h.groups and h.name != "k3s1"]


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    real = _real_k3s()
    require_world(h.arch for h in _site_hosts(real is not None))  # skip before building anything
    out = tmp_path_factory.mktemp("k3s-media")
    carried = {"amd64": real} if real else {arch: _stand_ins(out, arch) for arch in ("amd64", "arm64")}
    images = [TestImage("k3sfiles/web:1.0.0", arch, [rootfs_layer({"bin/busybox": f"busybox-{arch}".encode()}, arch=arch)])
              for arch in carried]
    write_oci_layout(out / "oci", images)
    (out / "app.yml").write_text(APP)
    files = [x for arch, (binary, tarball) in carried.items()
             for x in ("--file", f"k3s@{VERSION}/{arch}={binary}", "--file", f"k3s-airgap-images@{VERSION}/{arch}={tarball}")]
    bundle_builder("keygen", str(out / "vendor"))
    bundle_builder("build", str(out / "app.yml"), "-o", str(out / "k3sfiles-1.0.0"), "--images-from", f"oci:{out / 'oci'}",
                   "--platform", ",".join(f"linux/{arch}" for arch in carried), "--sign-key", str(out / "vendor.key"),
                   "--packages", "debian-12", "--package-profiles", "base,repo", *files)
    found = {"k3sfiles-1.0.0": out / "k3sfiles-1.0.0", "vendor.pub": out / "vendor.pub",
             **{f"binary-{arch}": b for arch, (b, _) in carried.items()},
             **{f"images-{arch}": i for arch, (_, i) in carried.items()}}
    if real is None:
        # 1.1.0 carries a newer k3s (stand-ins again) for every arch: the role must move to it, or stay pinned
        newer = {arch: _stand_ins(out, arch, NEWER) for arch in carried}
        (out / "app-1.1.0.yml").write_text(APP.replace("version: 1.0.0", "version: 1.1.0"))
        bundle_builder("build", str(out / "app-1.1.0.yml"), "-o", str(out / "k3sfiles-1.1.0"), "--images-from",
                       f"oci:{out / 'oci'}", "--platform", ",".join(f"linux/{arch}" for arch in carried),
                       "--sign-key", str(out / "vendor.key"),
                       *[x for arch, (binary, tarball) in newer.items()
                         for x in ("--file", f"k3s@{NEWER}/{arch}={binary}",
                                   "--file", f"k3s-airgap-images@{NEWER}/{arch}={tarball}")])
        found["k3sfiles-1.1.0"] = out / "k3sfiles-1.1.0"
        found.update({f"newer-binary-{arch}": b for arch, (b, _) in newer.items()})
    return found


@pytest.fixture(scope="module")
def site(media: dict[str, Path]) -> Iterator[Site]:
    hosts = _site_hosts(_real_k3s() is not None)
    require_world(h.arch for h in hosts)
    s = Site(os.environ.get("OD_E2E_K3S_SITE", "r-k3s"), hosts)
    s.down()  # what a killed earlier run may have left
    try:
        s.up()
        carry(s, {k: v for k, v in media.items() if k.startswith("k3sfiles-") or k == "vendor.pub"})
        res = s.jump(["ansible-playbook", "offline.delivery.import", "-e", "offline_delivery_bundle_src=/srv/transfer/k3sfiles-1.0.0",
                      "-e", json.dumps({"offline_delivery_vendor_keys_src": ["/srv/transfer/vendor.pub"]})],
                     timeout=PLAY_TIMEOUT)
        assert res.rc == 0 and recap(res)["failed"] == 0, f"import failed:\n{res.output[-5000:]}"
        yield s
    finally:
        if os.environ.get("OD_WORLD_KEEP") != "1":
            s.down()


def _k3s_play(site: Site, *options: str) -> Result:
    return site.jump(["ansible-playbook", "offline.delivery.k3s", *options], timeout=PLAY_TIMEOUT)


def _fetch_text(site: Site, host: str, url: str) -> str:
    script = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=30).read().decode())"
    res = site.exec(host, ["python3", "-c", script, url], timeout=120)
    assert res.rc == 0, f"GET {url} from {host} failed: {res.output[-2000:]}"
    return res.stdout


def _sha256_on(site: Site, host: str, path: str) -> str:
    res = site.exec(host, ["sha256sum", path], timeout=60)
    assert res.rc == 0, res.output
    return res.stdout.split()[0]


def _read(site: Site, host: str, path: str) -> str:
    res = site.exec(host, ["cat", path], timeout=30)
    assert res.rc == 0, f"{host}:{path}: {res.output}"
    return res.stdout


def _stat(site: Site, host: str, path: str) -> str:
    res = site.exec(host, ["stat", "-c", "%a %U %i", path], timeout=30)
    assert res.rc == 0, f"{host}:{path}: {res.output}"
    return res.stdout.strip()


def test_carried_files_are_served_with_matching_sha256(site: Site, media: dict[str, Path]) -> None:
    index = json.loads(_fetch_text(site, "k3s1", FILES_URL + "index.json"))
    by_key = {(e["name"], e["arch"]): e for e in index["files"]}
    arches = sorted(k.split("-", 1)[1] for k in media if k.startswith("binary-"))
    assert sorted(by_key) == sorted((n, a) for n in ("k3s", "k3s-airgap-images") for a in arches)
    assert index["schemaVersion"] == 1
    for (name, arch), entry in sorted(by_key.items()):
        src = media[f"{'binary' if name == 'k3s' else 'images'}-{arch}"]
        want = hashlib.sha256(src.read_bytes()).hexdigest()
        assert entry["digest"] == f"sha256:{want}" and entry["size"] == src.stat().st_size
        assert entry["url"] == f"{name}/{VERSION}/{arch}/{name}" and entry["releases"] == ["k3sfiles 1.0.0"]
        # fetched from a target over the site network, the bytes hash to the digest
        res = site.exec("k3s1", ["bash", "-c", f"python3 -c 'import urllib.request,sys; sys.stdout.buffer.write("
                                 f"urllib.request.urlopen(sys.argv[1], timeout=30).read())' '{FILES_URL}{entry['url']}'"
                                 " | sha256sum"], timeout=120)
        assert res.rc == 0 and res.stdout.split()[0] == want, res.output
        # on the repo host the served file is the blob itself (a hard link, no copy)
        served = _stat(site, "repo", f"{REPO_ROOT}/www/files/{entry['url']}").split()[2]
        blob = _stat(site, "repo", f"{REPO_ROOT}/blobs/sha256/{want}").split()[2]
        assert served == blob
    assert by_key[("k3s", "amd64")]["mode"] == "0755"


def test_check_mode_on_fresh_hosts_writes_nothing(site: Site) -> None:
    res = _k3s_play(site, "--check", "-e", "k3s_start=false")
    assert res.rc == 0, res.output[-5000:]
    assert "Would install k3s v1.30.2+k3s1 (amd64, server)" in res.output
    if "k3sarm" in _agents(site):
        assert "Would install k3s v1.30.2+k3s1 (arm64, agent)" in res.output
    for host in ("k3s1", *_agents(site)):
        gone = site.exec(host, ["sh", "-c", "ls /usr/local/bin/k3s /etc/rancher/k3s /etc/systemd/system/k3s*.service"],
                         timeout=30)
        assert gone.rc != 0 and "No such file" in gone.output, f"{host}: check mode wrote {gone.stdout}"


def test_role_installs_from_the_site(site: Site, media: dict[str, Path]) -> None:
    res = _k3s_play(site, "-e", "k3s_start=false")
    assert res.rc == 0, res.output[-5000:]
    for host in ("k3s1", *_agents(site)):
        arch = site.host(host).arch  # each host gets its own architecture's files
        assert recap(res, host)["failed"] == 0
        assert _sha256_on(site, host, "/usr/local/bin/k3s") == hashlib.sha256(media[f"binary-{arch}"].read_bytes()).hexdigest()
        assert _stat(site, host, "/usr/local/bin/k3s").split()[:2] == ["755", "root"]
        images = "/var/lib/rancher/k3s/agent/images/k3s-airgap-images.tar.zst"
        assert _sha256_on(site, host, images) == hashlib.sha256(media[f"images-{arch}"].read_bytes()).hexdigest()
        for path in ("/etc/rancher/k3s/config.yaml", "/etc/rancher/k3s/registries.yaml", "/etc/rancher/k3s/cluster-token"):
            assert _stat(site, host, path).split()[:2] == ["600", "root"], path
        registries = _read(site, host, "/etc/rancher/k3s/registries.yaml")
        assert re.search(r'"docker.io":\n    endpoint:\n      - "http://[0-9.]+:5000"\n    # .*\n    rewrite:\n'
                         r'      "\^library/\(\.\*\)": "\$1"\n', registries), registries
        assert re.search(r'"[0-9.]+:5000":\n    endpoint:\n      - "http://[0-9.]+:5000"', registries), registries
    ips = site.ips()
    server = _read(site, "k3s1", "/etc/rancher/k3s/config.yaml")
    assert "token-file: /etc/rancher/k3s/cluster-token" in server and "https-listen-port: 6443" in server
    assert "write-kubeconfig-mode: '0600'" in server and "server:" not in server
    unit = _read(site, "k3s1", "/etc/systemd/system/k3s.service")
    assert "ExecStart=/usr/local/bin/k3s server" in unit and "Restart=on-failure" in unit
    token = _read(site, "k3s1", "/etc/rancher/k3s/cluster-token").strip()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    for agent_host in _agents(site):
        agent = _read(site, agent_host, "/etc/rancher/k3s/config.yaml")
        assert f"server: https://{ips['k3s1']}:6443" in agent and "token-file: /etc/rancher/k3s/cluster-token" in agent
        agent_unit = _read(site, agent_host, "/etc/systemd/system/k3s-agent.service")
        assert "ExecStart=/usr/local/bin/k3s agent" in agent_unit and "Restart=on-failure" in agent_unit
        assert _read(site, agent_host, "/etc/rancher/k3s/cluster-token").strip() == token
    assert token not in res.output, "the token must never reach the play's output"


def test_second_run_and_check_mode_change_nothing(site: Site) -> None:
    token = _read(site, "k3s1", "/etc/rancher/k3s/cluster-token")
    for options in ((), ("--check",)):
        res = _k3s_play(site, "-e", "k3s_start=false", *options)
        assert res.rc == 0, res.output[-5000:]
        for host in ("k3s1", *_agents(site)):
            assert recap(res, host)["changed"] == 0, f"{options}: {host} changed:\n{res.output[-5000:]}"
    assert _read(site, "k3s1", "/etc/rancher/k3s/cluster-token") == token, "the token is made once"


def test_a_version_the_site_lacks_is_named(site: Site) -> None:
    res = _k3s_play(site, "-e", "k3s_start=false", "-e", "k3s_version=v9.9.9+k3s1", "--limit", "k3s1")
    assert res.rc != 0
    assert "index.json has no k3s v9.9.9+k3s1 for amd64 (k3s_version)" in res.output, res.output[-3000:]
    assert f"k3s/{VERSION}/amd64/k3s" in res.output and "--file k3s@VERSION/amd64=PATH" in res.output


def test_a_newer_import_moves_every_host_and_k3s_version_pins(site: Site, media: dict[str, Path]) -> None:
    if "k3sfiles-1.1.0" not in media:
        pytest.skip("with a real k3s binary given there is no second k3s build to move to")
    res = site.jump(["ansible-playbook", "offline.delivery.import", "-e", "offline_delivery_bundle_src=/srv/transfer/k3sfiles-1.1.0",
                     "-e", json.dumps({"offline_delivery_vendor_keys_src": ["/srv/transfer/vendor.pub"]})],
                    timeout=PLAY_TIMEOUT)
    assert res.rc == 0, f"import of 1.1.0 failed:\n{res.output[-5000:]}"
    hosts = ("k3s1", *_agents(site))

    def installed(host: str) -> str:
        return _sha256_on(site, host, "/usr/local/bin/k3s")

    def digest(key: str) -> str:
        return hashlib.sha256(media[key].read_bytes()).hexdigest()

    res = _k3s_play(site, "-e", "k3s_start=false")  # no k3s_version: the newest import's version, on every arch
    assert res.rc == 0, res.output[-5000:]
    for host in hosts:
        arch = site.host(host).arch
        assert installed(host) == digest(f"newer-binary-{arch}"), host
        assert recap(res, host)["changed"] > 0
    res = _k3s_play(site, "-e", "k3s_start=false", "-e", f"k3s_version={VERSION}")  # pinned back
    assert res.rc == 0, res.output[-5000:]
    for host in hosts:
        assert installed(host) == digest(f"binary-{site.host(host).arch}"), host


def test_k3s_cluster_runs_from_the_site(site: Site) -> None:
    if _real_k3s() is None:
        pytest.skip(NO_BINARY)
    res = _k3s_play(site)
    assert res.rc == 0, res.output[-5000:]
    nodes = 1 + len(_agents(site))
    ready = site.exec("k3s1", ["bash", "-c", "for i in $(seq 60); do n=$(k3s kubectl get nodes --no-headers 2>/dev/null "
                                             f"| grep -c ' Ready '); [ \"$n\" = {nodes} ] && exit 0; sleep 5; done; "
                                             "k3s kubectl get nodes; exit 1"], timeout=400)
    assert ready.rc == 0, f"the {nodes} nodes did not become Ready: {ready.output[-3000:]}"
    for host, unit in [("k3s1", "k3s"), *((a, "k3s-agent") for a in _agents(site))]:
        assert site.exec(host, ["systemctl", "is-active", unit], timeout=30).stdout.strip() == "active"
