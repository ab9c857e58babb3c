"""container_runtime on a fresh target, from the scenario's site repo: the engine, containerd, runc and Compose v2
installed from it without Recommends, daemon.json with the site registry (insecure, and Docker Hub's mirror)
loaded by a running, enabled dockerd that pulls the release's image from the site registry."""
import json
import os

import testinfra.utils.ansible_runner

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(
    os.environ["MOLECULE_INVENTORY_FILE"]).get_hosts("targets")

REPO_HOST = "od-mol-cr-repo"  # the scenario's offline_repo host (molecule.yml)
REGISTRY = f"{REPO_HOST}:5000"
SITE_APT = f"http://{REPO_HOST}:8080/apt/debian-12"
PACKAGES = ("docker.io", "containerd", "runc", "docker-compose")  # roles/container_runtime/vars/Debian-12.yml


def test_packages_installed_from_the_site_repo(host):
    for name in PACKAGES:
        pkg = host.package(name)
        assert pkg.is_installed, name
        # The installed version is the one the site repo offers (apt has no other source).
        madison = host.check_output(f"apt-cache madison {name}").splitlines()
        assert madison, f"{name}: no apt source offers it"
        assert all(SITE_APT in line for line in madison), madison
        assert any(line.split("|")[1].strip() == pkg.version for line in madison), (pkg.version, madison)


def test_no_recommends_installed(host):
    # docker.io Recommends apparmor, git, needrestart (among others): install_recommends is false.
    for name in ("git", "needrestart"):
        assert not host.package(name).is_installed, name


def test_daemon_json_names_the_site_registry(host):
    conf_dir = host.file("/etc/docker")
    assert conf_dir.is_directory and conf_dir.user == "root" and conf_dir.group == "root" and conf_dir.mode == 0o755
    daemon = host.file("/etc/docker/daemon.json")
    assert daemon.user == "root" and daemon.group == "root" and daemon.mode == 0o644
    assert json.loads(daemon.content_string) == {"insecure-registries": [REGISTRY], "iptables": True,
                                                 "registry-mirrors": [f"http://{REGISTRY}"]}


def test_dockerd_enabled_running_with_that_config(host):
    svc = host.service("docker")
    assert svc.is_enabled and svc.is_running
    registry = json.loads(host.check_output("docker info --format '{{json .RegistryConfig}}'"))
    assert [m.rstrip("/") for m in registry["Mirrors"]] == [f"http://{REGISTRY}"]
    insecure = registry["IndexConfigs"].get(REGISTRY) or {}
    assert insecure.get("Secure") is False, registry


def test_compose_v2_cli(host):
    assert host.check_output("docker compose version --short").startswith("2.")


def test_pulls_the_release_image_from_the_site_registry(host):
    # Plain HTTP: works only because the registry is an insecure registry in daemon.json.
    pulled = host.run(f"timeout 120 docker pull {REGISTRY}/mini/web:1.0.0")
    assert pulled.rc == 0, pulled.stderr
    # A Docker Hub name goes through the registry mirror (the target has no route out).
    mirrored = host.run("timeout 120 docker pull mini/web:1.0.0")
    assert mirrored.rc == 0, mirrored.stderr
