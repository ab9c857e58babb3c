"""The shop example: its models, its locally built images, and the app really running on docker.

The images are built (cached) by tests/world/shop_images.py for amd64 and arm64. The amd64 images are
loaded into the local engine and run on a private docker network with the env, config files and health
checks the model gives (resolved with offline_delivery_core.app.model, as the delivery roles do). The
images are also unpacked as root filesystems and run without a container runtime (arm64 through qemu), and
fed to bundle-builder to check that the 1.1.0 delta carries only the new API layers.
Every container, network and volume created here is named ``h4shop-<random>-...`` and removed at the end.
"""
from __future__ import annotations

import json
import os
import secrets as pysecrets
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from offline_delivery_core.app import model as app_model
from tests.world import shop_images

SHOP = Path(__file__).resolve().parents[2] / "examples" / "shop"
VERSIONS = ("1.0.0", "1.1.0", "1.2.0")
ELF_MACHINE = {"amd64": 0x3E, "arm64": 0xB7}  # e_machine: EM_X86_64, EM_AARCH64


def _load(version: str) -> dict:
    return app_model.load_model(yaml.safe_load((SHOP / f"app-{version}.yml").read_text()), f"app-{version}.yml")


def _docker_ok() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


# --------------------------------------------------------------------------------- models (no docker)

def test_models_validate_and_differ_only_in_the_api() -> None:
    models = {version: _load(version) for version in VERSIONS}
    diff = app_model.diff_models(models["1.0.0"], models["1.1.0"])
    assert diff["changed"] == {"api": ["env.SHOP_PAGE_SIZE", "image"]}
    assert diff["unchanged"] == ["db", "gateway", "redis"]
    assert diff["env_defaults"] == {"api": {"SHOP_PAGE_SIZE": {"old": "20", "new": "50"}}}
    broken = app_model.diff_models(models["1.1.0"], models["1.2.0"])
    assert broken["changed"] == {"api": ["image"]} and not broken["env_defaults"]
    refs = {version: app_model.image_refs(model) for version, model in models.items()}
    for component in ("db", "gateway", "redis"):
        assert refs["1.0.0"][component] == refs["1.1.0"][component] == refs["1.2.0"][component]
    assert [refs[v]["api"] for v in VERSIONS] == [f"shop/api:{v}" for v in VERSIONS]
    # Every image a model names is one the builder makes.
    built = {recipe.ref for recipe in shop_images.RECIPES}
    assert {ref for r in refs.values() for ref in r.values()} == built


def test_compose_file_matches_the_1_0_0_model() -> None:
    compose = yaml.safe_load((SHOP / "docker-compose.yml").read_text())
    model = _load("1.0.0")
    services = compose["services"]
    assert set(services) == set(model["components"])
    for name, component in model["components"].items():
        assert services[name]["image"] == component["image"], name
    assert services["gateway"]["ports"] == ["8080:8080"]
    assert "pgdata" in compose["volumes"]

    # bundle-builder from-compose turns it into a valid model with the same images and the secrets.
    from bundle_builder.compose import from_compose

    converted, report = from_compose(compose, name="shop", version="1.0.0", base_dir=SHOP)
    converted = app_model.load_model(converted, "converted docker-compose.yml")
    assert app_model.image_refs(converted) == app_model.image_refs(model)
    assert set(converted["secrets"]) == set(model["secrets"])
    assert converted["components"]["db"]["volumes"] == model["components"]["db"]["volumes"]
    assert any("DB_HOST" in line for line in report), "fixed service names must be reported"


# ------------------------------------------------------------------------------------- image builds



@pytest.fixture(scope="module")
def built() -> shop_images.ShopImages:
    if os.geteuid() != 0:
        pytest.skip("building the shop images needs root (mmdebstrap, overlayfs, chroot)")
    return shop_images.build_all(shop_images.ARCHES)


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def _json_blob(layout: Path, digest: str) -> Any:
    return json.loads(_blob(layout, digest).read_bytes())


def _platform_images(layout: Path) -> dict[str, dict[str, dict]]:
    """ref -> arch -> {"manifest": ..., "config": ...} read back from the OCI layout."""
    top = json.loads((layout / "index.json").read_text())
    out: dict[str, dict[str, dict]] = {}
    for entry in top["manifests"]:
        ref = entry["annotations"][shop_images.REF_ANNOTATION]
        index = _json_blob(layout, entry["digest"])
        assert index["annotations"][shop_images.REF_ANNOTATION] == ref
        for desc in index["manifests"]:
            manifest = _json_blob(layout, desc["digest"])
            config = _json_blob(layout, manifest["config"]["digest"])
            out.setdefault(ref, {})[desc["platform"]["architecture"]] = {
                "descriptor": desc, "manifest": manifest, "config": config, "digest": desc["digest"],
            }
    return out


@pytest.mark.timeout(3600)
def test_oci_layout_has_every_ref_for_both_arches(built: shop_images.ShopImages) -> None:
    layout = built.oci_layout
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    images = _platform_images(layout)
    assert set(images) == {recipe.ref for recipe in shop_images.RECIPES}
    for ref, per_arch in images.items():
        assert set(per_arch) == {"amd64", "arm64"}, ref
        for arch, image in per_arch.items():
            manifest, config = image["manifest"], image["config"]
            layers = [layer["digest"] for layer in manifest["layers"]]
            # Uncompressed layers: each digest is its diff_id, and each blob hashes to its name.
            assert config["rootfs"]["diff_ids"] == layers
            for digest in layers + [manifest["config"]["digest"]]:
                assert shop_images._sha256_file(_blob(layout, digest)) == digest
            assert config["architecture"] == arch and config["os"] == "linux"
            assert config.get("variant") == ("v8" if arch == "arm64" else None)
            assert image["descriptor"]["platform"] == shop_images._platform(arch)


@pytest.mark.timeout(3600)
def test_layers_are_shared_and_only_the_api_app_layer_differs(built: shop_images.ShopImages) -> None:
    images = _platform_images(built.oci_layout)
    for arch in ("amd64", "arm64"):
        layers = {ref: [l["digest"] for l in images[ref][arch]["manifest"]["layers"]] for ref in images}
        assert len({stack[0] for stack in layers.values()}) == 1, f"{arch}: one base layer for all images"
        api = [layers[f"shop/api:{v}"] for v in VERSIONS]
        assert api[0][:2] == api[1][:2] == api[2][:2], f"{arch}: api versions share base and packages"
        assert len({stack[2] for stack in api}) == 3, f"{arch}: each api version has its own app layer"
    # The unchanged components of 1.1.0 are the very images of 1.0.0: same index digests.
    refs_100 = app_model.image_refs(_load("1.0.0"))
    refs_110 = app_model.image_refs(_load("1.1.0"))
    for component in ("db", "gateway", "redis"):
        assert built.indexes[refs_100[component]] == built.indexes[refs_110[component]]
    assert built.indexes[refs_100["api"]] != built.indexes[refs_110["api"]]


@pytest.mark.timeout(3600)
def test_rebuild_is_cached_and_gives_identical_digests(built: shop_images.ShopImages) -> None:
    started = time.monotonic()
    again = shop_images.build_all(shop_images.ARCHES)
    assert again.indexes == built.indexes
    assert again.oci_layout == built.oci_layout
    assert time.monotonic() - started < 120, "a warm build must reuse the cache"


@pytest.mark.timeout(3600)
def test_build_drops_unreferenced_blobs_and_keeps_outputs_whole(built: shop_images.ShopImages) -> None:
    orphan = shop_images.blob_dir() / ("0" * 64)
    orphan.write_bytes(b"left over by an old recipe")
    again = shop_images.build_all(shop_images.ARCHES)
    assert not orphan.exists()
    for per_arch in _platform_images(again.oci_layout).values():
        for image in per_arch.values():
            for layer in image["manifest"]["layers"]:
                assert _blob(again.oci_layout, layer["digest"]).stat().st_size == layer["size"]
    assert all(path.exists() for path in again.docker_archives.values())


@pytest.mark.timeout(3600)
def test_arm64_images_carry_aarch64_binaries(built: shop_images.ShopImages) -> None:
    images = _platform_images(built.oci_layout)
    for arch in ("amd64", "arm64"):
        image = images["shop/api:1.0.0"][arch]
        assert image["config"]["architecture"] == arch
        header = _member_head(built.oci_layout, image["manifest"], "usr/bin/python3.11", 20)
        assert header[:4] == b"\x7fELF" and header[4] == 2, "a 64-bit ELF file"
        assert int.from_bytes(header[18:20], "little") == ELF_MACHINE[arch], f"{arch}: wrong e_machine"


def _member_head(layout: Path, manifest: dict, name: str, size: int) -> bytes:
    """First ``size`` bytes of ``name`` from the topmost layer of ``manifest`` that has it."""
    for layer in reversed(manifest["layers"]):
        with tarfile.open(_blob(layout, layer["digest"])) as tar:
            try:
                member = tar.getmember(name)
            except KeyError:
                continue
            handle = tar.extractfile(member)
            assert handle is not None, f"{name} is not a regular file"
            return handle.read(size)
    raise AssertionError(f"{name} not found in any layer")


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_layers_are_reproducible_from_scratch(
    built: shop_images.ShopImages, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold rebuild in an empty cache gives byte-identical base and packages layers (amd64, redis)."""
    monkeypatch.setenv("OD_CACHE", str(tmp_path / "cache"))
    try:
        sources = shop_images.debian_sources()
        recipe = next(r for r in shop_images.RECIPES if r.ref == "shop/redis:1.0.0")
        rebuilt = [shop_images.base_layer("amd64", sources), shop_images.packages_layer("amd64", sources, recipe)]
        manifest = _platform_images(built.oci_layout)["shop/redis:1.0.0"]["amd64"]["manifest"]
        assert rebuilt == [layer["digest"] for layer in manifest["layers"][:2]]
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.timeout(3600)
def test_changing_api_source_rebuilds_only_the_app_layer(
    built: shop_images.ShopImages, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop_copy = tmp_path / "shop"
    shutil.copytree(SHOP, shop_copy)
    source = shop_copy / "api" / "1.0.0" / "shop_api.py"
    source.write_text(source.read_text() + "\n# a changed line\n")
    monkeypatch.setattr(shop_images, "SHOP_DIR", shop_copy)

    def no_commands(argv: list[str], what: str, **kwargs: object) -> None:
        raise AssertionError(f"the cached base/packages must be reused, but '{what}' ran")

    monkeypatch.setattr(shop_images, "_run", no_commands)
    recipe = next(r for r in shop_images.RECIPES if r.ref == "shop/api:1.0.0")
    changed = shop_images.build_image(recipe, "amd64", shop_images.debian_sources())
    original = _platform_images(built.oci_layout)["shop/api:1.0.0"]["amd64"]["manifest"]["layers"]
    assert changed.layers[:2] == [layer["digest"] for layer in original[:2]]
    assert changed.layers[2] != original[2]["digest"]


# ---------------------------------------------------------------------------------- running on docker

class ShopOnDocker:
    """The shop's containers on a private network, started the way the model says."""

    def __init__(self, archive: Path, workdir: Path) -> None:
        self.prefix = f"h4shop-{pysecrets.token_hex(3)}"
        self.network = f"{self.prefix}-net"
        self.workdir = workdir
        self.secrets: dict[str, str] = {}
        self.volumes: set[str] = set()
        self.model: dict = {}
        _docker("load", "-i", str(archive), timeout=600)
        _docker("network", "create", self.network)

    def container(self, component: str) -> str:
        return f"{self.prefix}-{component}"

    def hosts(self) -> dict[str, str]:
        return {name: self.container(name) for name in self.model["components"]}

    def use(self, version: str) -> dict:
        self.model = _load(version)
        for name, spec in self.model["secrets"].items():
            self.secrets.setdefault(name, app_model.generate_secret(spec))  # generated once, kept after
        return self.model

    def env(self, component: str) -> dict[str, str]:
        return app_model.effective_env(self.model, component, secrets=self.secrets, hosts=self.hosts())

    def start(self, component: str) -> None:
        """docker run one component: image, env, volumes and config files from the model."""
        spec = self.model["components"][component]
        # Read-only root and a private /tmp: what systemd RootDirectory= with ProtectSystem=strict gives.
        argv = ["run", "-d", "--name", self.container(component), "--network", self.network,
                "--read-only", "--tmpfs", "/tmp"]
        for key, value in sorted(self.env(component).items()):
            argv += ["-e", f"{key}={value}"]
        for volume in spec["volumes"]:
            name = f"{self.prefix}-{volume['name']}"
            self.volumes.add(name)
            argv += ["-v", f"{name}:{volume['path']}"]
        for index, config in enumerate(spec["config_files"]):
            content = app_model.render_config(self.model, component, index, env=self.env(component),
                                              secrets=self.secrets)
            path = self.workdir / f"{component}-{index}"
            path.write_text(content)
            path.chmod(int(config["mode"], 8))
            argv += ["-v", f"{path}:{config['path']}:ro"]
        _docker(*argv, spec["image"])

    def remove(self, component: str) -> None:
        _docker("rm", "-f", "-v", self.container(component))

    def ip(self, component: str) -> str:
        out = _docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", self.container(component))
        return json.loads(out)[self.network]["IPAddress"]

    def wait_healthy(self, component: str, timeout: float = 120) -> None:
        """Poll the component's model health check (http/tcp/exec) until it passes, bounded in time."""
        health = self.model["components"][component]["health"]
        deadline = time.monotonic() + timeout
        last = "not probed yet"
        while time.monotonic() < deadline:
            ok, last = self.probe(component, health)
            if ok:
                return
            time.sleep(1)
        logs = subprocess.run(["docker", "logs", "--tail", "40", self.container(component)],
                              capture_output=True, text=True, timeout=30)
        raise AssertionError(f"{component} not healthy after {timeout}s: {last}\n{logs.stdout}{logs.stderr}")

    def probe(self, component: str, health: dict) -> tuple[bool, str]:
        if "http" in health:
            status, body = http(f"http://{self.ip(component)}:{health['http']['port']}{health['http']['path']}")
            return status == 200, f"HTTP {status} {body}"
        if "tcp" in health:
            try:
                with socket.create_connection((self.ip(component), health["tcp"]["port"]), timeout=3):
                    return True, "connected"
            except OSError as exc:
                return False, str(exc)
        proc = subprocess.run(["docker", "exec", self.container(component), *health["exec"]],
                              capture_output=True, text=True, timeout=30)
        return proc.returncode == 0, (proc.stdout + proc.stderr).strip()

    def start_all(self) -> None:
        for level in app_model.start_order(self.model):
            for component in level:
                self.start(component)
            for component in level:
                self.wait_healthy(component)

    def gateway(self, path: str, body: dict | None = None) -> tuple[int, Any]:
        return http(f"http://{self.ip('gateway')}:8080{path}", body)

    def cleanup(self) -> None:
        names = _docker("ps", "-aq", "--filter", f"name=^{self.prefix}-").split()
        if names:
            subprocess.run(["docker", "rm", "-f", "-v", *names], capture_output=True, timeout=120)
        subprocess.run(["docker", "network", "rm", self.network], capture_output=True, timeout=60)
        for volume in sorted(self.volumes):
            subprocess.run(["docker", "volume", "rm", "-f", volume], capture_output=True, timeout=60)


def _docker(*args: str, timeout: float = 120) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])} ... failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def http(url: str, body: dict | None = None) -> tuple[int, Any]:
    """(status, parsed JSON or text) of a GET, or a POST when ``body`` is given; (0, error) if unreachable."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except OSError as exc:
        return 0, str(exc)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


@pytest.fixture(scope="module")
def shop(built: shop_images.ShopImages, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShopOnDocker]:
    if not _docker_ok():
        pytest.skip("no usable Docker engine (docker info failed)")
    run = ShopOnDocker(built.docker_archives["amd64"], tmp_path_factory.mktemp("shop-config"))
    try:
        yield run
    finally:
        run.cleanup()


@pytest.mark.docker
@pytest.mark.timeout(3600)
def test_shop_runs_upgrades_and_breaks_as_designed(shop: ShopOnDocker) -> None:
    # 1.0.0: everything healthy, an order placed through the gateway is listed.
    shop.use("1.0.0")
    shop.start_all()
    assert shop.gateway("/api/healthz") == (200, {"status": "ok", "db": "ok", "redis": "ok"})
    assert shop.gateway("/api/version") == (200, {"version": "1.0.0", "currency": "EUR", "page_size": 20})
    status, order = shop.gateway("/api/orders", {"item": "tea", "quantity": 3})
    assert status == 201 and order["item"] == "tea" and order["placed_total"] == 1, order
    assert shop.gateway("/api/orders", {"item": ""})[0] == 400
    status, listing = shop.gateway("/api/orders")
    assert status == 200 and [o["id"] for o in listing["orders"]] == [order["id"]]
    assert shop.gateway("/api/orders/summary")[0] == 404, "1.0.0 has no summary endpoint"

    # The generated secrets are really required.
    _assert_db_password_enforced(shop)
    _assert_redis_password_enforced(shop)

    # The database keeps its data across a restart and a re-creation on the same volume.
    _docker("restart", shop.container("db"))
    shop.wait_healthy("db")
    shop.remove("db")
    shop.start("db")
    shop.wait_healthy("db")
    shop.wait_healthy("api")
    status, listing = shop.gateway("/api/orders")
    assert status == 200 and [o["item"] for o in listing["orders"]] == ["tea"]

    # 1.1.0 replaces only the API: new version, new env default, new endpoint, the data still there.
    shop.use("1.1.0")
    shop.remove("api")
    shop.start("api")
    shop.wait_healthy("api")
    assert shop.gateway("/api/version") == (200, {"version": "1.1.0", "currency": "EUR", "page_size": 50})
    status, summary = shop.gateway("/api/orders/summary")
    assert status == 200, summary
    assert summary["orders"] == 1 and summary["by_item"] == {"tea": {"orders": 1, "quantity": 3}}

    # 1.2.0 is broken on purpose: its health check fails.
    shop.use("1.2.0")
    shop.remove("api")
    shop.start("api")
    time.sleep(2)
    ok, detail = shop.probe("api", shop.model["components"]["api"]["health"])
    assert not ok and "HTTP 500" in detail and "discount_cents" in detail, detail
    with pytest.raises(AssertionError, match="not healthy"):
        shop.wait_healthy("api", timeout=10)


def _assert_db_password_enforced(shop: ShopOnDocker) -> None:
    query = ["psql", "-h", "127.0.0.1", "-U", "shop", "-d", "shop", "-tAc", "SELECT count(*) FROM orders"]
    right = subprocess.run(["docker", "exec", "-e", f"PGPASSWORD={shop.secrets['db_password']}",
                            shop.container("db"), *query], capture_output=True, text=True, timeout=30)
    assert right.returncode == 0 and right.stdout.strip() == "1", right.stderr
    wrong = subprocess.run(["docker", "exec", "-e", "PGPASSWORD=wrong", shop.container("db"), *query],
                           capture_output=True, text=True, timeout=30)
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr


def _assert_redis_password_enforced(shop: ShopOnDocker) -> None:
    anonymous = subprocess.run(["docker", "exec", shop.container("redis"), "redis-cli", "get", "shop:orders_placed"],
                               capture_output=True, text=True, timeout=30)
    assert "NOAUTH" in anonymous.stdout + anonymous.stderr
    authed = subprocess.run(["docker", "exec", "-e", f"REDISCLI_AUTH={shop.secrets['redis_password']}",
                             shop.container("redis"), "redis-cli", "get", "shop:orders_placed"],
                            capture_output=True, text=True, timeout=30)
    assert authed.stdout.strip() == "1", authed.stdout + authed.stderr


# ------------------------------------------------------------- unpacked root filesystems (systemd target)

def _make_dev_nodes(root: Path) -> None:
    """The few device nodes programs expect; systemd's MountAPIVFS= gives a unit the same. No mounts needed."""
    for name, minor in (("null", 3), ("zero", 5), ("full", 7), ("random", 8), ("urandom", 9)):
        node = root / "dev" / name
        if not node.exists():
            os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
            node.chmod(0o666)


def _chroot(root: Path, *argv: str, timeout: float = 300) -> str:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
    proc = subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(argv)} in {root.name}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_unpacked_images_run_without_a_container_runtime(
    built: shop_images.ShopImages, tmp_path: Path, arch: str
) -> None:
    """Each image unpacked as a root filesystem (as the systemd target does) runs its programs.

    arm64 runs through qemu-user binfmt: containers cannot start under qemu here, root filesystems can.
    """
    model = _load("1.1.0")
    refs = app_model.image_refs(model)
    roots = {name: tmp_path / name for name in refs}
    try:
        for name, ref in refs.items():
            shop_images.unpack_image(built.oci_layout, ref, arch, roots[name])
            _make_dev_nodes(roots[name])
        # gateway: the model's config file, rendered with the API on the host network, passes nginx -t.
        conf = app_model.render_config(model, "gateway", 0, env={"API_HOST": "127.0.0.1", "API_PORT": "8000"},
                                       secrets={})
        (roots["gateway"] / "etc/nginx/conf.d/shop.conf").write_text(conf)
        assert "test is successful" in _chroot(roots["gateway"], "/usr/sbin/nginx", "-t", "-c", "/etc/nginx/nginx.conf")
        # api: the release's code and its Debian libraries import.
        out = _chroot(roots["api"], "/bin/sh", "-c",
                      "cd /opt/shop-api && python3 -c 'import psycopg2, redis, shop_api; print(shop_api.VERSION)'")
        assert out.strip() == "1.1.0"
        # db: the image's own postgres user (no host lookup) can initialise a cluster.
        _chroot(roots["db"], "setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
                "/usr/lib/postgresql/15/bin/initdb", "-D", "/tmp/pgtest", "--no-locale", "-U", "shop", "-A", "trust")
        assert (roots["db"] / "tmp/pgtest/PG_VERSION").read_text().strip() == "15"
        assert "Redis server v=7." in _chroot(roots["redis"], "/usr/bin/redis-server", "--version")
        machine = _chroot(roots["redis"], "setpriv", "--reuid=redis", "--regid=redis", "--init-groups", "/usr/bin/uname", "-m")
        assert machine.strip() == {"amd64": "x86_64", "arm64": "aarch64"}[arch]
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.timeout(3600)
def test_bundle_delta_from_1_0_0_to_1_1_0_carries_only_the_api_app_layer(
    built: shop_images.ShopImages, tmp_path: Path
) -> None:
    """The layer design pays off in bundle-builder: the 1.1.0 delta holds the new API layer, no base."""
    def build(version: str, *extra: str) -> dict:
        argv = [str(Path(sys.executable).with_name("bundle-builder")), "build", str(SHOP / f"app-{version}.yml"),
                "-o", str(tmp_path / version), "--images-from", f"oci:{built.oci_layout}",
                "--platform", "linux/amd64,linux/arm64", "--unsigned", "--json", *extra]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    try:
        full = build("1.0.0")
        delta = build("1.1.0", "--base", full["path"])
        images = _platform_images(built.oci_layout)
        new_layers = {images["shop/api:1.1.0"][arch]["manifest"]["layers"][2]["digest"] for arch in ("amd64", "arm64")}
        carried = {blob["digest"] for blob in _bundle_manifest(Path(delta["path"]))["blobs"]
                   if blob.get("bundled", True)}
        assert new_layers <= carried
        shared = {layer["digest"] for ref in ("shop/db:1.0.0", "shop/gateway:1.0.0") for arch in ("amd64", "arm64")
                  for layer in images[ref][arch]["manifest"]["layers"]}
        assert not shared & carried, "layers of unchanged images must come from the base release"
        assert delta["size"] < full["size"] / 1000, (delta["size"], full["size"])
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _bundle_manifest(bundle: Path) -> dict:
    with tarfile.open(bundle) as tar:
        handle = tar.extractfile("manifest.json")
        assert handle is not None
        return json.loads(handle.read())
