"""SystemdRuntime without systemd: unit rendering (quoting, specifiers, users, signals, limits) and the files
a start writes, with systemctl/journalctl answered by a recorder. The real services run in
tests/e2e/test_app_systemd_runtime.py."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from offline_delivery_core.app.runtime import ComponentSpec, DeployError
from offline_delivery_core.targets.systemd import (SystemdRuntime, exec_argv, iso_time, kill_signal, mount_unit_name,
                                                   quote_arg, read_marks, render_env_file, resolve_user, unit_path,
                                                   unit_settings)
from offline_delivery_core.targets.rootfs import load_rootfs

MANIFEST = "sha256:" + "ab" * 32
LAYER = "sha256:" + "12" * 32
ROOT = os.geteuid() == 0


def make_spec(**changes: object) -> ComponentSpec:
    data: Dict[str, object] = dict(
        name="db", app="shop", version="1.0.0", image="10.0.0.2:5000/shop/db@sha256:" + "cd" * 32,
        reference="shop/db:1.0.0", index_digest="sha256:" + "cd" * 32, manifest_digest=MANIFEST,
        platform="linux/amd64", entrypoint=None, command=None, user=None,
        env={"POSTGRES_PASSWORD": "s3cr'et $HOME %i", "PGDATA": "/var/lib/postgresql/data"},
        config_files=[{"path": "/etc/shop/app.conf", "content": "password=x\n", "mode": "0640"}],
        volumes=[{"name": "pgdata", "path": "/var/lib/postgresql/data"}], ports=[], health=None,
        depends_on={}, local_deps=[], replicas=1, resources={"cpus": "0.5", "memory": "64Mi"},
        fingerprint="sha256:" + "ef" * 32)
    data.update(changes)
    return ComponentSpec(**data)  # type: ignore[arg-type]


class Systemd:
    """Answers the runtime's commands like systemd would; ``cp`` (volume seeding), ``mount`` and ``umount``
    (reading the image) really run."""

    def __init__(self) -> None:
        self.calls: List[List[str]] = []
        self.state: Dict[str, str] = {}   # unit -> ActiveState
        self.results: Dict[str, Tuple[str, str]] = {}   # unit -> (Result, ExecMainStatus)
        self.after_start = "active"        # a oneshot that ran to its end: "inactive"

    def __call__(self, argv: List[str]) -> Tuple[int, str, str]:
        self.calls.append(argv)
        args = argv[argv.index("systemctl") + 1:] if "systemctl" in argv else argv
        if argv[0] in ("cp", "env", "umount"):
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            return proc.returncode, proc.stdout, proc.stderr
        if argv[0] == "journalctl":
            return 0, "2026-11-22T02:00:00+0000 node2 shop-db[1]: FATAL: something\n", ""
        if args[0] == "show":
            active = self.state.get(args[1], "inactive")
            result, status = self.results.get(args[1], ("success", "0"))
            return 0, (f"ActiveState={active}\nSubState={'running' if active == 'active' else 'dead'}\n"
                       f"ActiveEnterTimestamp={'@1795312800' if active == 'active' else ''}\n"
                       f"NeedDaemonReload=no\nResult={result}\nExecMainStatus={status}\nLoadState=loaded\n"
                       f"MainPID={4242 if active == 'active' else 0}\n"), ""
        if args[0] == "restart":
            for unit in args[1:]:
                self.state.setdefault(unit, self.after_start)
        if args[:3] == ["disable", "--quiet", "--now"]:
            for unit in args[3:]:
                self.state.pop(unit, None)
        return 0, "", ""

    def commands(self) -> List[str]:
        return [" ".join(c[c.index("systemctl"):]) for c in self.calls if "systemctl" in c]


@pytest.fixture()
def host(tmp_path: Path):
    """apps/state/unit dirs and an image (one layer in the store) with users, a seeded volume path and a binary."""
    apps, state, units = tmp_path / "apps", tmp_path / "state", tmp_path / "units"
    units.mkdir()
    image = apps / "shop" / "images" / MANIFEST.split(":")[1]
    image.mkdir(parents=True)
    root = apps / ".layers" / LAYER.split(":")[1]
    for d in ("etc", "usr/bin", "var/lib/postgresql/data", "usr/share/empty"):
        (root / d).mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "usr/bin/postgres").write_text("")
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\npostgres:x:105:110::/var/lib/postgresql:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\npostgres:x:110:\nssl-cert:x:111:postgres\n")
    (root / "var/lib/postgresql/data/seed").write_text("from the image")
    if ROOT:
        os.chown(root / "var/lib/postgresql/data", 105, 110)
    os.chmod(root / "var/lib/postgresql/data", 0o700)
    (image / "image.json").write_text(json.dumps({"config": {
        "Entrypoint": ["postgres"], "Cmd": ["-c", "listen_addresses=*"], "Env": ["PATH=/usr/bin:/bin", "PGDATA=/x"],
        "WorkingDir": "/var/lib/postgresql", "User": None, "StopSignal": "SIGINT"}, "layers": [LAYER]}))
    systemd = Systemd()
    runtime = SystemdRuntime("shop", apps_dir=str(apps), state_dir=str(state), run=systemd, unit_dir=str(units),
                             sleep=lambda _s: None)
    return runtime, systemd, tmp_path


# -- quoting ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arg, want", [
    ("plain", '"plain"'),
    ("with space", '"with space"'),
    ("100%", '"100%%"'),
    ("$HOME ${X}", '"$$HOME $${X}"'),
    ('say "hi" \\o/', '"say \\"hi\\" \\\\o/"'),
    ("a\nb\tc\x01", '"a\\nb\\tc\\x01"'),
    ("'single'", '"\'single\'"'),
    (";", '";"'),
])
def test_exec_arguments_quoted_for_systemd(arg: str, want: str) -> None:
    assert quote_arg(arg) == want


def test_env_file_values_taken_literally() -> None:
    text = render_env_file({"A": "plain", "B": "$HOME %i \\n", "C": "it's \"$x\" `y` \\", "D": ""})
    assert text.splitlines() == ["A='plain'", "B='$HOME %i \\n'", 'C="it\'s \\"\\$x\\" \\`y\\` \\\\"', "D=''"]
    with pytest.raises(ValueError, match="not \\[A-Za-z_\\]"):
        render_env_file({"BAD-NAME": "x"})
    with pytest.raises(ValueError, match="NUL"):
        render_env_file({"A": "x\x00"})


@pytest.mark.parametrize("path", ["/srv/with space", "/srv/a:b", "relative", "/srv/%i", "/srv/../etc"])
def test_paths_needing_quotes_refused(path: str) -> None:
    with pytest.raises(DeployError, match="must be absolute"):
        unit_path(path, "volume")


@pytest.mark.parametrize("given, want", [(None, "SIGTERM"), ("SIGQUIT", "SIGQUIT"), ("quit", "SIGQUIT"),
                                         ("2", "SIGINT"), ("SIGRTMIN+3", "SIGRTMIN+3")])
def test_kill_signal(given, want) -> None:
    assert kill_signal(given) == want


def test_unknown_stop_signal_refused() -> None:
    with pytest.raises(DeployError, match="not a signal name"):
        kill_signal("SIGNOPE")


# -- users and argv -----------------------------------------------------------------------------------


def test_users_resolved_in_the_image(host) -> None:
    runtime, _systemd, _tmp = host
    root = load_rootfs(runtime.images_dir, runtime.store, MANIFEST).lowerdirs[0]   # the image's one layer
    assert resolve_user("postgres", root) == (105, 110)
    assert resolve_user("postgres:ssl-cert", root) == (105, 111)
    assert resolve_user("105", root) == (105, 110)
    assert resolve_user("65534:65534", root) == (65534, 65534)
    assert resolve_user("4000", root) == (4000, 0)
    assert resolve_user("", root) is None
    with pytest.raises(DeployError, match="'nobody' is not in the image's /etc/passwd"):
        resolve_user("nobody", root)


def test_argv_follows_dockers_rules(host) -> None:
    runtime, _systemd, _tmp = host
    rootfs = load_rootfs(runtime.images_dir, runtime.store, MANIFEST)
    layer = rootfs.lowerdirs[0]   # the image's one layer is all there is to read
    assert exec_argv(make_spec(), rootfs.config, layer) == ["/usr/bin/postgres", "-c", "listen_addresses=*"]
    assert exec_argv(make_spec(command=["-p", "1"]), rootfs.config, layer) == ["/usr/bin/postgres", "-p", "1"]
    assert exec_argv(make_spec(entrypoint=["/bin/sh"]), rootfs.config, layer) == ["/bin/sh"]
    with pytest.raises(DeployError, match="'nope' is not in the image's PATH"):
        exec_argv(make_spec(entrypoint=["nope"]), rootfs.config, layer)
    with pytest.raises(DeployError, match="neither the model nor the image"):
        exec_argv(make_spec(), {}, layer)


# -- start, observe, probe, remove ---------------------------------------------------------------------


def test_start_writes_unit_env_config_and_volume(host) -> None:
    runtime, systemd, tmp = host
    spec = make_spec(user="postgres", local_deps=["redis"], command=["-c", "x=100% $y"])
    runtime.prepare([spec])
    runtime.start([spec], all_specs=[spec])
    unit = (tmp / "units" / "od-shop-db.service").read_text()
    root = f"{tmp}/apps/shop/roots/db/root"
    assert read_marks(str(tmp / "units" / "od-shop-db.service")) == {
        "fingerprint": spec.fingerprint, "app": "shop", "component": "db", "unit format": "2"}
    settings = unit_settings(str(tmp / "units" / "od-shop-db.service"))
    assert settings["RootDirectory"] == root and settings["MountAPIVFS"] == "yes"
    assert settings["EnvironmentFile"] == f"{tmp}/state/apps/shop/env/db.env"
    assert settings["ExecStart"] == '"/usr/bin/postgres" "-c" "x=100%% $$y"'
    assert settings["WorkingDirectory"] == "/var/lib/postgresql"
    assert (settings["User"], settings["Group"], settings["KillSignal"]) == ("105", "110", "SIGINT")
    assert (settings["CPUQuota"], settings["MemoryMax"], settings["Restart"]) == ("50%", str(64 << 20), "on-failure")
    assert f"BindPaths={tmp}/apps/shop/volumes/pgdata:/var/lib/postgresql/data\n" in unit
    assert f"BindReadOnlyPaths={tmp}/apps/shop/config/db/etc/shop/app.conf:/etc/shop/app.conf\n" in unit
    assert "BindReadOnlyPaths=/etc/hosts /etc/resolv.conf\n" in unit
    assert "After=network-online.target od-shop-redis.service\n" in unit
    assert "Wants=network-online.target od-shop-redis.service\n" in unit
    assert "s3cr" not in unit and "password=x" not in unit
    # environment: the image's first, then the spec's (which wins), 0600 in a 0700 directory
    env = tmp / "state/apps/shop/env/db.env"
    assert env.read_text().splitlines() == ["PATH='/usr/bin:/bin'", "PGDATA='/var/lib/postgresql/data'",
                                            'POSTGRES_PASSWORD="s3cr\'et \\$HOME %i"']
    assert stat.S_IMODE(env.stat().st_mode) == 0o600 and stat.S_IMODE(env.parent.stat().st_mode) == 0o700
    config = tmp / "apps/shop/config/db/etc/shop/app.conf"
    assert config.read_text() == "password=x\n" and stat.S_IMODE(config.stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp / "apps/shop/config/db").stat().st_mode) == 0o700
    # the fresh volume is seeded from the image, owner and mode kept
    volume = tmp / "apps/shop/volumes/pgdata"
    assert (volume / "seed").read_text() == "from the image" and stat.S_IMODE(volume.stat().st_mode) == 0o700
    if ROOT:
        assert (volume.stat().st_uid, volume.stat().st_gid) == (105, 110)
    assert systemd.commands()[-4:] == ["systemctl daemon-reload", "systemctl enable --quiet od-shop-db.service",
                                       "systemctl restart od-shop-db.service",
                                       "systemctl show od-shop-db.service --timestamp=unix --property "
                                       "ActiveState,SubState,ActiveEnterTimestamp,NeedDaemonReload,Result,"
                                       "ExecMainStatus,LoadState,MainPID"]
    observed = runtime.observe()
    assert list(observed) == ["db"] and observed["db"].fingerprint == spec.fingerprint
    assert observed["db"].running and observed["db"].started_at == "2026-11-22T02:00:00+00:00"
    # a volume with data is never reseeded
    (volume / "seed").write_text("changed by the app")
    runtime.start([spec], all_specs=[spec])
    assert (volume / "seed").read_text() == "changed by the app"


def test_volume_without_image_content_starts_empty(host) -> None:
    runtime, _systemd, tmp = host
    spec = make_spec(volumes=[{"name": "cache", "path": "/var/cache/none"}])
    runtime.start([spec], all_specs=[spec])
    assert os.listdir(tmp / "apps/shop/volumes/cache") == []


def test_a_unit_that_dies_at_once_is_an_error_naming_it(host) -> None:
    runtime, systemd, _tmp = host
    systemd.state["od-shop-db.service"] = "failed"
    with pytest.raises(DeployError) as err:
        runtime.start([make_spec()], all_specs=[])
    text = str(err.value)
    assert "component db: unit od-shop-db.service is failed/dead" in text
    assert "journalctl -u od-shop-db.service" in text and "FATAL: something" in text


def test_failing_systemctl_names_component_and_unit(host) -> None:
    runtime, systemd, _tmp = host

    def failing(argv: List[str]) -> Tuple[int, str, str]:
        if "restart" in argv:
            return 1, "", "Job for od-shop-db.service failed."
        return systemd(argv)
    runtime.run = failing
    with pytest.raises(DeployError, match=r"component db: systemctl restart od-shop-db.service failed to start "
                                          r"component db: Job for od-shop-db.service failed.; see systemctl status"):
        runtime.start([make_spec()], all_specs=[])


def test_unit_of_another_app_with_the_same_name_is_not_overwritten(host) -> None:
    runtime, _systemd, tmp = host
    other = tmp / "units" / "od-shop-db.service"
    other.write_text("# offline-delivery fingerprint: x\n# offline-delivery app: shop-db\n"
                     "# offline-delivery component: x\n[Service]\n")
    with pytest.raises(DeployError, match="belongs to app 'shop-db'"):
        runtime.start([make_spec()], all_specs=[])
    assert runtime.observe() == {}   # not this app's unit


def test_replicas_of_components_with_ports_or_volumes_refused(host) -> None:
    runtime, _systemd, _tmp = host
    with pytest.raises(DeployError, match="replicas 2: on a systemd host every instance would listen on the same "
                                          "host port \\(5432\\)"):
        runtime.prepare([make_spec(replicas=2, ports=[{"port": 5432, "protocol": "tcp", "name": "pg"}])])
    with pytest.raises(DeployError, match="would share the directory of volume pgdata"):
        runtime.prepare([make_spec(replicas=2)])


def test_port_less_replicas_run_as_template_instances(host) -> None:
    """replicas N of a port-less component: one template unit, N enabled instances; scaling up, down and back
    to one unit stops exactly the instances no longer wanted."""
    runtime, systemd, tmp = host
    spec = make_spec(name="worker", volumes=[], replicas=3, health={"exec": ["true"], "timeout": 3, "interval": 5,
                                                                   "retries": 3, "start_period": 0})
    runtime.start([spec], all_specs=[spec])
    template = tmp / "units" / "od-shop-worker@.service"
    assert read_marks(str(template))["instances"] == "3"
    assert "Description=shop 1.0.0: worker (shop/db:1.0.0) instance %i\n" in template.read_text()
    instances = [f"od-shop-worker@{i}.service" for i in (1, 2, 3)]
    assert "systemctl " + "enable --quiet " + " ".join(instances) in systemd.commands()
    assert "systemctl " + "restart " + " ".join(instances) in systemd.commands()
    assert runtime.observe()["worker"].running
    systemd.state["od-shop-worker@2.service"] = "failed"
    assert not runtime.observe()["worker"].running
    assert not runtime.probe(spec)[0] and "od-shop-worker@2.service is failed" in runtime.probe(spec)[1]
    systemd.state["od-shop-worker@2.service"] = "active"

    two = make_spec(name="worker", volumes=[], replicas=2)
    runtime.start([two], all_specs=[two])
    assert "systemctl disable --quiet --now od-shop-worker@3.service" in systemd.commands()
    assert read_marks(str(template))["instances"] == "2"

    one = make_spec(name="worker", volumes=[], replicas=1)
    runtime.start([one], all_specs=[one])
    assert "systemctl disable --quiet --now od-shop-worker@1.service od-shop-worker@2.service" in systemd.commands()
    assert not template.exists() and (tmp / "units" / "od-shop-worker.service").exists()
    runtime.remove(["worker"], all_specs=[])
    assert not list((tmp / "units").glob("*.service"))   # the image's mount unit goes with a prune


def test_a_job_is_a_oneshot_its_dependents_wait_for(host) -> None:
    """A job: Type=oneshot, never restarted, not enabled (not re-run at boot); a dependent orders itself after
    it without pulling it in. Its state is the last run's result."""
    runtime, systemd, tmp = host
    job = make_spec(name="migrate", volumes=[], kind="job")
    api = make_spec(name="api", volumes=[], local_deps=["migrate", "db"], depends_on={
        "migrate": {"condition": "completed"}, "db": {"condition": "started"}})
    systemd.after_start = "inactive"
    runtime.start([job], all_specs=[job, api])
    unit = (tmp / "units" / "od-shop-migrate.service").read_text()
    settings = unit_settings(str(tmp / "units" / "od-shop-migrate.service"))
    assert settings["Type"] == "oneshot" and "Restart" not in settings and "[Install]" not in unit
    assert read_marks(str(tmp / "units" / "od-shop-migrate.service"))["kind"] == "job"
    assert not [c for c in systemd.commands() if c.startswith("systemctl enable")]
    assert "systemctl restart od-shop-migrate.service" in systemd.commands()
    assert runtime.job_state(job)[0] == "succeeded" and runtime.observe()["migrate"].running
    systemd.results["od-shop-migrate.service"] = ("exit-code", "3")
    state, detail = runtime.job_state(job)
    assert state == "failed" and "exit status 3" in detail and "journalctl -u od-shop-migrate.service" in detail
    assert not runtime.observe()["migrate"].running
    systemd.state["od-shop-migrate.service"] = "activating"
    assert runtime.job_state(job)[0] == "running"

    systemd.after_start = "active"
    runtime.start([api], all_specs=[job, api])
    api_unit = unit_settings(str(tmp / "units" / "od-shop-api.service"), "[Unit]")
    assert api_unit["After"] == "network-online.target od-shop-migrate.service od-shop-db.service"
    assert api_unit["Wants"] == "network-online.target od-shop-db.service"


def test_probes(host) -> None:
    runtime, systemd, tmp = host
    spec = make_spec(health={"exec": ["pg_isready", "-h", "127.0.0.1"], "timeout": 3, "interval": 5,
                             "retries": 3, "start_period": 0})
    ok, reason = runtime.probe(spec)
    assert not ok and "unit od-shop-db.service is inactive" in reason
    runtime.start([spec], all_specs=[spec])
    assert runtime.probe(spec) == (True, "")
    probe = systemd.calls[-1]
    assert probe[:4] == ["timeout", "-k", "2", "8"] and "systemd-run" in probe
    # in the running component's namespaces (its root, /run and private /tmp), as its user, its env file
    assert f"EnvironmentFile={tmp}/state/apps/shop/env/db.env" in probe and "NoNewPrivileges=yes" in probe
    assert "CapabilityBoundingSet=CAP_SYS_CHROOT CAP_SYS_PTRACE CAP_SETUID CAP_SETGID" in probe
    enter = probe[probe.index("--") + 1:]
    assert enter[:3] == ["/usr/bin/nsenter", "--target=4242", "--root"]
    assert enter[enter.index("--"):] == ["--", "pg_isready", "-h", "127.0.0.1"]
    # a tcp probe on a port nobody listens on fails with the address
    ok, reason = runtime.probe(make_spec(health={"tcp": {"port": 1}, "timeout": 1}))
    assert not ok and "TCP 127.0.0.1:1" in reason


def test_a_slow_hosts_check_gets_its_scaled_time_and_a_check_stopped_at_its_limit_says_so(tmp_path: Path) -> None:
    """health_scale 3: a 3 s check may take 9 s (RuntimeMaxSec=9). systemd-run says 1 both for a check that
    exited 1 and for one stopped at RuntimeMaxSec=; the time it took tells them apart (the CI failure of
    stop 24: a python check under qemu stopped at 3 s was reported as 'exited 1')."""
    systemd, now = Systemd(), [0.0]
    answers = {"quick": (1, "summary written 40 s ago\n", "", 0.5), "stopped": (1, "", "", 9.2)}
    answer = ["quick"]

    def run(argv: List[str]) -> Tuple[int, str, str]:
        if "systemd-run" not in argv:
            return systemd(argv)
        systemd.calls.append(argv)
        rc, out, err, seconds = answers[answer[0]]
        now[0] += seconds
        return rc, out, err

    runtime = SystemdRuntime("shop", apps_dir=str(tmp_path / "apps"), state_dir=str(tmp_path / "state"), run=run,
                             unit_dir=str(tmp_path), sleep=lambda _s: None, clock=lambda: now[0], health_scale=3)
    spec = make_spec(name="tally", volumes=[], health={"exec": ["python3", "/opt/poll/poll.py", "check-tally"],
                                                       "timeout": 3, "interval": 5, "retries": 6, "start_period": 2})
    (tmp_path / "od-shop-tally.service").write_text("[Service]\nRootDirectory=/r\nUser=poll\n")
    systemd.state["od-shop-tally.service"] = "active"
    assert runtime.check_timeout(spec) == 9
    assert runtime.probe(spec) == (False, "exec python3 /opt/poll/poll.py check-tally exited 1: summary written 40 s ago")
    probe = systemd.calls[-1]
    assert probe[:4] == ["timeout", "-k", "2", "14"] and "RuntimeMaxSec=9" in probe
    answer[0] = "stopped"
    assert runtime.probe(spec) == (False, "exec python3 /opt/poll/poll.py check-tally did not finish within 9s")


def test_remove_and_uninstall_keep_volumes(host) -> None:
    runtime, systemd, tmp = host
    db = make_spec()
    web = make_spec(name="web", volumes=[], config_files=[], fingerprint="sha256:" + "01" * 32)
    runtime.start([db, web], all_specs=[db, web])
    api = make_spec(name="api", volumes=[], config_files=[], local_deps=["db"], fingerprint="sha256:" + "02" * 32)
    runtime.start([api], all_specs=[db, web, api])
    runtime.remove(["db", "api"], all_specs=[web])    # the dependent stops first
    stops = [c for c in systemd.commands() if c.startswith("systemctl disable")]
    assert stops == ["systemctl disable --quiet --now od-shop-api.service",
                     "systemctl disable --quiet --now od-shop-db.service"]
    runtime.start([db], all_specs=[db, web])
    runtime.remove(["web", "not-there"], all_specs=[db])
    mount = root_mount(runtime, "db")
    assert sorted(os.listdir(tmp / "units")) == ["od-shop-db.service", mount]   # web's root went with web
    assert os.listdir(tmp / "apps/shop/roots") == ["db"]
    assert not (tmp / "state/apps/shop/env/web.env").exists()
    assert "systemctl disable --quiet --now od-shop-web.service" in systemd.commands()
    removed = runtime.uninstall(keep_data=True)
    assert removed[0] == "od-shop-db.service" and f"{tmp}/apps/shop/images" in removed
    assert f"systemctl stop {mount}" in systemd.commands()
    assert removed[2] == f"{tmp}/apps/.layers/{LAYER[7:]}"     # no image on the host uses it any more
    assert os.listdir(tmp / "units") == [] and (tmp / "apps/shop/volumes/pgdata/seed").exists()
    assert runtime.volume_dirs(db) == {"pgdata": f"{tmp}/apps/shop/volumes/pgdata"}
    runtime.uninstall(keep_data=False)
    assert not (tmp / "apps/shop").exists()


def test_host_ports_are_every_tcp_port(host) -> None:
    runtime, _systemd, _tmp = host
    spec = make_spec(ports=[{"name": "http", "port": 8080, "protocol": "tcp", "publish": 8080},
                            {"name": "pg", "port": 5432, "protocol": "tcp"},
                            {"name": "dns", "port": 53, "protocol": "udp"}])
    assert runtime.host_ports(spec) == [5432, 8080]


def test_start_times_iso_and_older_systemd_text(host) -> None:
    runtime, systemd, _tmp = host
    assert iso_time("@0") == "1970-01-01T00:00:00+00:00" and iso_time("") is None and iso_time("n/a") is None
    runtime.start([make_spec()], all_specs=[])

    def old_systemd(argv: List[str]) -> Tuple[int, str, str]:
        if "--timestamp=unix" in argv:
            return 1, "", "systemctl: unrecognized option '--timestamp=unix'"
        rc, out, err = systemd(argv)
        return rc, out.replace("@1795312800", "Sun 2026-11-22 03:00:00 CET"), err
    runtime.run = old_systemd
    assert runtime.observe()["db"].started_at == "Sun 2026-11-22 03:00:00 CET"


@pytest.mark.parametrize("path, name", [   # what systemd-escape --path --suffix=mount prints (systemd 252)
    ("/srv/offline-delivery-apps/shop/images/ab12/root", "srv-offline\\x2ddelivery\\x2dapps-shop-images-ab12-root.mount"),
    ("/srv/a+b@c/.x/d_e:f", "srv-a\\x2bb\\x40c-.x-d_e:f.mount"),
    ("/", "-.mount"),
])
def test_mount_unit_names_as_systemd_escapes_them(path: str, name: str) -> None:
    assert mount_unit_name(path) == name


def test_prune_removes_images_no_component_or_kept_release_uses_and_their_layers(host) -> None:
    """After a deploy: the image a component runs from stays, a kept release's image stays for a rollback, any
    other image goes, and so do the layers no image of any app on the host lists."""
    runtime, _systemd, tmp = host
    images, store = tmp / "apps/shop/images", tmp / "apps/.layers"
    for digest, layer in (("cd" * 32, "34" * 32), ("ef" * 32, "56" * 32)):
        (images / digest).mkdir(parents=True)
        (images / digest / "image.json").write_text(json.dumps({"config": {}, "layers": [LAYER, "sha256:" + layer]}))
        (store / layer).mkdir()
    (tmp / "apps/other/images/77").mkdir(parents=True)     # another app's image keeps its layer
    (tmp / "apps/other/images/77/image.json").write_text(json.dumps({"layers": ["sha256:" + "78" * 32]}))
    (store / ("78" * 32)).mkdir()
    (store / ("99" * 32)).mkdir()                          # a layer nothing lists
    spec = make_spec()
    runtime.start([spec], all_specs=[spec])
    removed = runtime.prune({"sha256:" + "cd" * 32})       # the running db's image is not among the kept ones
    assert removed == [str(images / ("ef" * 32)), str(store / ("56" * 32)), str(store / ("99" * 32))]
    assert sorted(os.listdir(images)) == sorted([MANIFEST[7:], "cd" * 32])
    assert sorted(os.listdir(store)) == sorted([".lock", LAYER[7:], "34" * 32, "78" * 32])
    assert runtime.prune({"sha256:" + "cd" * 32}) == []       # a second run finds nothing to do


def test_a_component_root_is_its_mount_points_over_the_image_layers(host) -> None:
    """The root a unit runs from: a mount unit of a read-only overlay, the component's own mount points layer
    first (what the image lacks of its volume and config paths, with the image's owners on the way), then the
    image's layers; made again (the component stopped first) only when these change."""
    runtime, systemd, tmp = host
    spec = make_spec(volumes=[{"name": "pgdata", "path": "/var/lib/postgresql/data"},
                              {"name": "extra", "path": "/srv/new/dir"}])
    runtime.start([spec], all_specs=[spec])
    name = root_mount(runtime, "db")
    text = (tmp / "units" / name).read_text()
    mounts = tmp / "apps/shop/roots/db/mounts"
    assert f"Where={tmp}/apps/shop/roots/db/root\n" in text and "Type=overlay\n" in text
    assert f"Options=ro,lowerdir={mounts}:{tmp}/apps/.layers/{LAYER[7:]}\n" in text
    assert (mounts / "srv/new/dir").is_dir() and (mounts / "etc/shop/app.conf").is_file()
    assert not (mounts / "var/lib/postgresql/data").exists()     # the image has it
    assert (mounts / "etc/hosts").is_file() and (mounts / "etc/resolv.conf").is_file()
    assert stat.S_IMODE((mounts / "tmp").stat().st_mode) == 0o1777
    assert not [c for c in systemd.commands() if c.startswith("systemctl start")]   # the unit's restart mounts it
    systemd.calls.clear()
    runtime.start([spec], all_specs=[spec])                   # same root: nothing stops, the mount stays
    assert not [c for c in systemd.commands() if c.startswith("systemctl stop")]
    moved = make_spec(volumes=[{"name": "pgdata", "path": "/var/lib/postgresql/data"}], config_files=[])
    systemd.calls.clear()
    runtime.start([moved], all_specs=[moved])
    assert systemd.commands()[:2] == ["systemctl stop od-shop-db.service", f"systemctl stop {name}"]
    assert not (mounts / "srv").exists() and not (mounts / "etc/shop").exists()


def root_mount(runtime: SystemdRuntime, component: str) -> str:
    return mount_unit_name(runtime.root_dir(component) + "/root")
