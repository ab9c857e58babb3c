"""Tests for bundle_builder/compose.py (bundle-builder from-compose) on realistic compose files."""

from __future__ import annotations

import os
import pathlib
import shutil
import textwrap

import pytest
import yaml

from bundle_builder.compose import ComposeError, from_compose
from offline_delivery_core.app.model import load_model, select_modules, start_order

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "compose"


def convert(fixture: str, name: str = "app", version: str = "1.0.0", base_dir: pathlib.Path | None = None):
    base = base_dir or FIXTURES / fixture
    compose = yaml.safe_load((base / "docker-compose.yml").read_text())
    model, report = from_compose(compose, name=name, version=version, base_dir=base)
    # the CLI writes the model with yaml.safe_dump; what it writes must load back as a valid model
    assert load_model(yaml.safe_load(yaml.safe_dump(model, sort_keys=False))) == load_model(model)
    return model, report


def convert_text(tmp_path: pathlib.Path, text: str, **files: str):
    (tmp_path / "docker-compose.yml").write_text(textwrap.dedent(text))
    for rel, content in files.items():
        target = tmp_path / rel.replace("__", "/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    return convert("", base_dir=tmp_path)


def lines_for(report: list[str], prefix: str) -> list[str]:
    return [line for line in report if line.startswith(prefix + ":")]


def has_line(report: list[str], prefix: str, fragment: str) -> bool:
    return any(fragment in line for line in lines_for(report, prefix))


# ------------------------------------------------------------------------------------ wordpress + mysql

def test_wordpress_mysql():
    model, report = convert("wordpress", name="wordpress", version="6.4.2")
    assert model["name"] == "wordpress" and model["version"] == "6.4.2"
    db = model["components"]["db"]
    assert db == {
        "image": "mariadb:10.6.4-focal",
        "command": ["--default-authentication-plugin=mysql_native_password"],
        "ports": [3306, 33060],
        "env": {"MYSQL_ROOT_PASSWORD": "somewordpress", "MYSQL_DATABASE": "wordpress", "MYSQL_USER": "wordpress",
                "MYSQL_PASSWORD": "wordpress"},
        "volumes": [{"name": "db-data", "path": "/var/lib/mysql"}],
        # WORDPRESS_DB_HOST=db in wordpress, which depends on db: how to reach db is db's export now
        "exports": {"WORDPRESS_DB_HOST": "${host}"},
    }
    wordpress = model["components"]["wordpress"]
    assert "WORDPRESS_DB_HOST" not in wordpress["env"]
    assert wordpress["ports"] == [{"port": 80, "publish": 80}]
    assert wordpress["depends_on"] == {"db": {"condition": "started"}}
    assert wordpress["volumes"] == [{"name": "wp-data", "path": "/var/www/html"}]
    assert start_order(load_model(model)) == [["db"], ["wordpress"]]
    assert has_line(report, "services.db.volumes[0]", "volume 'db_data' renamed to 'db-data'")
    assert has_line(report, "services.db.restart", "not converted")
    assert has_line(report, "services.wordpress.restart", "not converted")
    assert has_line(report, "services.wordpress.environment.WORDPRESS_DB_HOST",
                    "service host name 'db' converted to an export of db (WORDPRESS_DB_HOST: ${host}")
    # values that merely equal a service name, in keys that are no host, are not flagged
    assert not lines_for(report, "services.db.environment.MYSQL_DATABASE")
    # wordpress:latest carries its tag explicitly: no tag note
    assert not lines_for(report, "services.wordpress.image")
    assert has_line(report, "services.wordpress.volumes[0]", "volume 'wp_data' renamed to 'wp-data'")
    assert len(report) == 5, report


# ------------------------------------------------------------------------------------ the shop

def test_shop():
    model, report = convert("shop", name="shop", version="1.0.0")
    comps = model["components"]
    assert list(comps) == ["gateway", "api", "db", "redis"]
    assert model["secrets"] == {"db_password": {"length": 32, "charset": "alphanumeric"}}
    assert "do-not-ship-me" not in yaml.safe_dump(model)
    # .env substitution, with a default for the unset API_TAG
    assert [comps[n]["image"] for n in comps] == ["shop/gateway:1.0.0", "shop/api:1.0.0", "shop/db:1.0.0",
                                                  "shop/redis:1.0.0"]
    gateway = comps["gateway"]
    nginx = (FIXTURES / "shop" / "gateway" / "nginx.conf").read_text()
    assert gateway["config_files"] == [{"path": "/etc/nginx/conf.d/default.conf", "content": nginx, "mode": "0644"}]
    assert gateway["depends_on"] == {"api": {"condition": "healthy"}}
    assert gateway["health"] == {"exec": ["curl", "-fsS", "http://localhost:8080/healthz"], "interval": 10,
                                 "timeout": 3, "retries": 5, "start_period": 0}
    api = comps["api"]
    assert api["command"] == ["python3", "/app/server.py", "--port", "8000"]
    assert api["ports"] == [8000]
    # env_file (comments, export prefix, quotes) then environment; a literal ${ is escaped for the model
    assert api["env"] == {"SHOP_CURRENCY": "EUR", "LOG_LEVEL": "info", "GREETING": "Hello, $${name}!",
                          "DB_PASSWORD_FILE": "/run/secrets/db_password", "REDIS_URL": "redis://redis:6379/0"}
    assert comps["db"]["exports"] == {"DB_HOST": "${host}"}, "DB_HOST: db became db's export"
    assert api["health"]["exec"] == ["/bin/sh", "-c", "curl -fsS http://localhost:8000/healthz || exit 1"]
    assert (api["health"]["interval"], api["health"]["start_period"]) == (5, 10)
    assert api["depends_on"] == {"db": {"condition": "healthy"}, "redis": {"condition": "started"}}
    assert api["config_files"] == [{"path": "/run/secrets/db_password", "content": "${secrets.db_password}",
                                    "mode": "0400"}]
    db = comps["db"]
    assert db["volumes"] == [{"name": "pgdata", "path": "/var/lib/postgresql/data"}]
    assert db["resources"] == {"cpus": "1.5", "memory": "512Mi"}
    redis = comps["redis"]
    assert redis["command"] == ["redis-server", "--save", "", "--appendonly", "no"]
    # docker's own healthcheck defaults made explicit
    assert redis["health"] == {"exec": ["redis-cli", "ping"], "interval": 30, "timeout": 30, "retries": 3,
                               "start_period": 0}
    loaded = load_model(model)
    assert loaded["components"]["api"]["env"]["GREETING"] == "Hello, $${name}!"
    assert start_order(loaded) == [["db", "redis"], ["api"], ["gateway"]]

    assert has_line(report, ".env", "substituted from .env: TAG")
    assert has_line(report, "interpolation", "API_TAG")
    assert has_line(report, "secrets.db_password", "generated on site")
    assert has_line(report, "services.gateway.volumes[0]", "converted to a config file at /etc/nginx/conf.d/default.conf")
    assert has_line(report, "services.api.build", "ignored")
    assert has_line(report, "services.api.secrets[0]", "/run/secrets/db_password")
    assert has_line(report, "services.db.deploy.resources.limits.memory", "'512m' converted to 512Mi")
    assert has_line(report, "services.api.environment.REDIS_URL", "service host name 'redis'")
    assert any("config file /etc/nginx/conf.d/default.conf: refers to service host name 'api'" in line
               for line in report)


# ------------------------------------------------------------------------------------ every supported key

def test_every_supported_key():
    model, report = convert("everything", name="everything", version="2.3.1")
    web = model["components"]["web"]
    assert web["image"] == "registry.local:5000/acme/web:2.3.1"
    assert web["entrypoint"] == ["/docker-entrypoint.sh"]
    assert web["command"] == ["nginx", "-g", "daemon off;"]
    assert web["user"] == "101:101"
    assert web["ports"] == [
        {"port": 80, "publish": 8080},
        {"port": 443, "publish": 8443},
        {"port": 53, "protocol": "udp", "publish": 5353},
        9000,
        {"name": "metrics", "port": 9100, "publish": 9100},
    ]
    # YAML merge key, numbers, booleans, and $$ (compose's escape) kept literal in the model
    assert web["env"] == {"TZ": "UTC", "WORKERS": "4", "DEBUG": "false", "TEMPLATE": "$${NOT_INTERPOLATED}"}
    assert load_model(model)["components"]["web"]["env"]["TEMPLATE"] == "$${NOT_INTERPOLATED}"
    assert web["config_files"] == [
        {"path": "/etc/nginx/conf.d/site.conf", "content": "server { listen 80; root /usr/share/nginx/html; }\n",
         "mode": "0%o" % ((FIXTURES / "everything/conf/site.conf").stat().st_mode & 0o777)},
        {"path": "/web_conf", "content": "events {}\nhttp { include /etc/nginx/conf.d/*.conf; }\n", "mode": "0444"},
        {"path": "/etc/motd", "content": "Welcome to everything\n", "mode": "0440"},
    ]
    assert web["volumes"] == [
        {"name": "web-html", "path": "/usr/share/nginx/html"},
        {"name": "cache", "path": "/var/cache/nginx"},
        {"name": "logs", "path": "/var/log/nginx"},
        {"name": "web-tmp-scratch", "path": "/tmp/scratch"},
    ]
    assert web["health"] == {"exec": ["/bin/sh", "-c", "wget -qO- http://localhost/ || exit 1"], "interval": 90,
                             "timeout": 2, "retries": 4, "start_period": 20}
    assert web["replicas"] == 2
    assert web["resources"] == {"cpus": "0.5", "memory": "1Gi"}
    # web waits for worker to complete: worker (no restart:, compose's default "no") becomes a job
    assert web["depends_on"] == {"app": {"condition": "healthy"}, "worker": {"condition": "completed"}}

    app = model["components"]["app"]
    assert app["image"] == "acme/app@sha256:" + "0123456789abcdef" * 4
    assert app["user"] == "1000"
    assert app["env"] == {
        "DATABASE_URL": "postgres://app:secret@db.example.com:5432/app",
        "QUOTED_DOUBLE": 'a "quoted" value',
        "QUOTED_SINGLE": "keep $${this} literal",
        "INLINE": "value",
        "SPACES": "padded",
        "EQUALS": "a=b=c",
        "APP_MODE": "production",
        "EMPTY": "",
    }
    assert app["replicas"] == 3
    assert app["health"]["exec"][:2] == ["python3", "-c"]
    assert app["config_files"] == [
        {"path": "/run/secrets/api_key", "content": "${secrets.api_key}", "mode": "0400"},
        {"path": "/etc/app/signing.key", "content": "${secrets.signing_key}", "mode": "0400"},
    ]
    assert model["secrets"] == {"api_key": {"length": 32, "charset": "alphanumeric"},
                                "signing_key": {"length": 32, "charset": "alphanumeric"}}
    worker = model["components"]["worker"]
    assert worker["kind"] == "job" and list(worker)[0] == "kind"
    assert app["depends_on"] == {"worker": {"condition": "completed"}}
    assert worker["image"] == "acme/worker:latest"
    assert worker["resources"] == {"cpus": "0.25", "memory": "256Mi"}
    assert worker["config_files"][0]["path"] == "/etc/worker.ini"
    assert worker["config_files"][0]["content"] == "[worker]\nqueue = jobs\n"

    expected = {
        "version": "compose file format version '3.9' ignored",
        "x-common-env": "extension ignored",
        "interpolation": "HOST_LABEL",
        "secrets.api_key": "generated on site",
        "secrets.signing-key": "converted to secret 'signing_key'",
        "services.web.ports[1]": "binding to host address 127.0.0.1 is not supported",
        "services.web.ports[3]": "random host port",
        "services.web.volumes[0]": "converted to a config file",
        "services.web.volumes[1]": "(a directory) converted to an empty persistent volume 'web-html'",
        "services.web.volumes[4]": "anonymous volume at /tmp/scratch",
        "services.web.healthcheck.timeout": "'1500ms' rounded to 2s",
        "services.web.deploy.resources.limits.memory": "'1g' converted to 1Gi",
        "services.worker": "converted to a job (kind: job): web waits for it to complete",
        "services.app.depends_on.worker": "service_started converted to completed: worker is a job",
        "services.app.env_file[1]": "optional.env not found",
        "services.app.secrets[1]": "/etc/app/signing.key holding ${secrets.signing_key}",
        "services.worker.image": "assumed acme/worker:latest",
        "services.worker.volumes[0]": "converted to a config file at /etc/worker.ini",
    }
    for prefix, fragment in expected.items():
        assert has_line(report, prefix, fragment), (prefix, report)
    assert not lines_for(report, "name")  # the compose project name equals --name


# ------------------------------------------------------------------------------------ unsupported keys

def test_unsupported_keys_are_all_reported():
    model, report = convert("unsupported", name="edge", version="0.1.0")
    comps = model["components"]
    assert sorted(comps) == ["builder-only", "proxy-service", "worker"]
    assert comps["builder-only"] == {"image": "edge/builder-only:0.1.0"}
    proxy = comps["proxy-service"]
    assert proxy["ports"] == [8443]
    assert proxy["env"] == {"MODE": "edge"}
    assert proxy["security"] == {"capabilities": ["NET_ADMIN"]}
    assert "health" not in proxy and "depends_on" not in proxy
    assert proxy["volumes"] == [{"name": "proxy-service-docker-sock", "path": "/var/run/docker.sock"},
                                {"name": "certs", "path": "/certs"}]
    worker = comps["worker"]
    assert worker["depends_on"] == {"proxy-service": {"condition": "started"}}
    assert "env" not in worker and "config_files" not in worker

    expected = {
        "networks": "top-level 'networks' not converted",
        "x-ci": "extension ignored",
        "volumes.certs": "driver, driver_opts not converted",
        "services.Proxy_Service": "renamed to component 'proxy-service'",
        "services.builder-only.build": "only build:, and a bundle needs an image; assumed image edge/builder-only:0.1.0",
        "services.Proxy_Service.ports[0]": "ranges are not supported",
        "services.Proxy_Service.environment.SHELL_ONLY": "no value",
        "services.Proxy_Service.volumes[0]": "(outside the compose directory)",
        "services.Proxy_Service.volumes[1]": "tmpfs at /tmp not converted",
        "services.Proxy_Service.volumes[2]": "mode z not converted",
        "services.Proxy_Service.healthcheck": "disabled",
        "services.Proxy_Service.depends_on.missing-service": "no service 'missing-service'",
        "services.Proxy_Service.container_name": "not converted",
        "services.Proxy_Service.restart": "not converted",
        "services.Proxy_Service.privileged": "refused on purpose",
        "services.Proxy_Service.cap_add": "kept as security.capabilities: NET_ADMIN",
        "services.Proxy_Service.networks": "not converted",
        "services.Proxy_Service.labels": "not converted",
        "services.Proxy_Service.logging": "not converted",
        "services.Proxy_Service.x-owner": "extension ignored",
        "services.worker.environment.NOTE": "newline",
        "configs.external_conf": "external config",
        "services.worker.healthcheck.start_interval": "not converted",
        "services.worker.deploy.mode": "not converted",
        "services.worker.deploy.restart_policy": "not converted",
        "services.worker.deploy.resources.reservations": "limits only",
        "services.worker.links[0]": "converted to depends_on",
        "services.worker.working_dir": "WORKDIR",
    }
    for prefix, fragment in expected.items():
        assert has_line(report, prefix, fragment), (prefix, report)
    # read-only named volume and the random host port are noted too
    assert has_line(report, "services.Proxy_Service.volumes[2]", "mounted read-write")
    assert has_line(report, "services.Proxy_Service.ports[1]", "random host port")


# ------------------------------------------------------------------------------------ focused cases

def test_env_list_and_mapping_forms_and_key_alone(tmp_path):
    model, report = convert_text(tmp_path, """
        services:
          a:
            image: a:1
            environment: ["X=1", "Y=", "Z", "URL=http://b:80/x"]
          b:
            image: b:1
            environment: {P: 1.5, Q: null, "bad-key": v}
    """)
    assert model["components"]["a"]["env"] == {"X": "1", "Y": "", "URL": "http://b:80/x"}
    assert model["components"]["b"]["env"] == {"P": "1.5"}
    assert has_line(report, "services.a.environment.Z", "no value")
    assert has_line(report, "services.b.environment.Q", "no value")
    assert has_line(report, "services.b.environment.bad-key", "invalid variable name")
    assert has_line(report, "services.a.environment.URL", "service host name 'b'")


def test_environment_overrides_env_file(tmp_path):
    model, report = convert_text(tmp_path, """
        services:
          a:
            image: a:1
            env_file: [a.env, missing.env]
            environment:
              SAME: from-environment
    """, **{"a.env": "SAME=from-file\nONLY_FILE=1\nNOEQUALS\n"})
    assert model["components"]["a"]["env"] == {"SAME": "from-environment", "ONLY_FILE": "1"}
    assert has_line(report, "services.a.env_file[1]", "missing.env not found")
    assert has_line(report, "services.a.env_file[0]:3", "'NOEQUALS' has no '='")


def test_env_file_double_quoted_newline_is_refused(tmp_path):
    model, report = convert_text(tmp_path, """
        services:
          a: {image: "a:1", env_file: a.env}
    """, **{"a.env": 'GOOD="x"\nMULTI="line1\\nline2"\n'})
    assert model["components"]["a"]["env"] == {"GOOD": "x"}
    assert has_line(report, "services.a.env_file[0]:MULTI", "newline")


def test_bind_mount_file_modes_kept(tmp_path):
    (tmp_path / "entry.sh").write_text("#!/bin/sh\nexec \"$@\"\n")
    os.chmod(tmp_path / "entry.sh", 0o755)
    (tmp_path / "key.pem").write_text("-----BEGIN-----\n")
    os.chmod(tmp_path / "key.pem", 0o600)
    model, report = convert_text(tmp_path, """
        services:
          a:
            image: a:1
            volumes: ["./entry.sh:/entry.sh:ro", "./key.pem:/etc/key.pem"]
    """)
    files = model["components"]["a"]["config_files"]
    assert [(f["path"], f["mode"]) for f in files] == [("/entry.sh", "0755"), ("/etc/key.pem", "0600")]
    assert files[0]["content"] == "#!/bin/sh\nexec \"$@\"\n"


def test_bind_mount_binary_file_and_escape_outside(tmp_path):
    inner = tmp_path / "project"
    inner.mkdir()
    (inner / "blob.bin").write_bytes(b"\x00\xff\x00")
    (tmp_path / "secret.txt").write_text("outside")
    model, report = convert_text(inner, """
        services:
          a:
            image: a:1
            volumes: ["./blob.bin:/data/blob.bin", "../secret.txt:/etc/secret.txt", "./nope.conf:/etc/nope.conf"]
    """)
    assert "config_files" not in model["components"]["a"]
    assert [v["path"] for v in model["components"]["a"]["volumes"]] == ["/data/blob.bin", "/etc/secret.txt",
                                                                       "/etc/nope.conf"]
    assert has_line(report, "services.a.volumes[0]", "(not a text file)")
    assert has_line(report, "services.a.volumes[1]", "(outside the compose directory)")
    assert has_line(report, "services.a.volumes[2]", "(missing)")
    assert "outside" not in yaml.safe_dump(model)


def test_config_content_with_dollar_brace_is_escaped(tmp_path):
    model, report = convert_text(tmp_path, """
        services:
          a:
            image: a:1
            volumes: ["./run.sh:/run.sh"]
    """, **{"run.sh": "echo ${HOME} {{ jinja }}\n"})
    cfg = model["components"]["a"]["config_files"][0]
    assert cfg["content"] == "echo $${HOME} {{ jinja }}\n"
    assert has_line(report, "services.a.volumes[0]", "literal '${' in run.sh escaped")


def test_shared_named_volume_is_split_and_reported(tmp_path):
    model, report = convert_text(tmp_path, """
        services:
          a: {image: "a:1", volumes: ["shared:/data"]}
          b: {image: "b:1", volumes: ["shared:/srv"]}
        volumes: {shared: {}}
    """)
    assert model["components"]["a"]["volumes"] == [{"name": "shared", "path": "/data"}]
    assert model["components"]["b"]["volumes"] == [{"name": "shared-b", "path": "/srv"}]
    assert has_line(report, "services.b.volumes[0]", "the data is NOT shared")


def test_healthcheck_forms(tmp_path):
    model, report = convert_text(tmp_path, """
        services:
          a:
            image: a:1
            healthcheck: {test: ["CMD-SHELL", "pg_isready -U x"], interval: 2s, timeout: 10s, retries: 2}
          b:
            image: b:1
            healthcheck: {test: ["CMD"]}
          c:
            image: c:1
            healthcheck: {disable: true}
          d:
            image: d:1
            healthcheck: {interval: 5s}
    """)
    assert model["components"]["a"]["health"] == {"exec": ["/bin/sh", "-c", "pg_isready -U x"], "interval": 2,
                                                  "timeout": 2, "retries": 2, "start_period": 0}
    assert has_line(report, "services.a.healthcheck.timeout", "shortened to 2s")
    assert "health" not in model["components"]["b"]
    assert has_line(report, "services.b.healthcheck.test", "cannot read test")
    assert has_line(report, "services.c.healthcheck", "disabled")
    assert "health" not in model["components"]["d"]
    assert has_line(report, "services.d.healthcheck", "the image's own HEALTHCHECK")


def test_depends_on_healthy_and_start_order(tmp_path):
    model, _ = convert_text(tmp_path, """
        services:
          web: {image: "web:1", depends_on: {api: {condition: service_healthy, restart: true}}}
          api: {image: "api:1", depends_on: [db]}
          db: {image: "db:1"}
    """)
    loaded = load_model(model)
    assert loaded["components"]["web"]["depends_on"] == {"api": {"condition": "healthy"}}
    assert start_order(loaded) == [["db"], ["api"], ["web"]]


def test_depends_on_extra_options_reported(tmp_path):
    _, report = convert_text(tmp_path, """
        services:
          web: {image: "web:1", depends_on: {api: {condition: service_started, required: false}}}
          api: {image: "api:1"}
    """)
    assert has_line(report, "services.web.depends_on.api.required", "not converted")


def test_interpolation_defaults_and_escapes(tmp_path):
    model, report = convert_text(tmp_path, """
        services:
          a:
            image: "a:${TAG:-9.9}"
            command: ["echo", "$$HOME", "${SET}", "$SET", "${UNSET}", "${EMPTY:-d}", "${EMPTY-d}", "${SET:+yes}"]
    """, **{".env": "SET=value\nEMPTY=\n"})
    assert model["components"]["a"]["image"] == "a:9.9"
    assert model["components"]["a"]["command"] == ["echo", "$HOME", "value", "value", "", "d", "", "yes"]
    assert has_line(report, "interpolation", "TAG, UNSET")
    assert has_line(report, ".env", "EMPTY, SET")


def test_service_names_are_sanitized_and_dependencies_follow(tmp_path):
    model, report = convert_text(tmp_path, """
        services:
          Web_App: {image: "web:1", depends_on: [my.db]}
          my.db: {image: "db:1"}
    """)
    assert sorted(model["components"]) == ["my-db", "web-app"]
    assert model["components"]["web-app"]["depends_on"] == {"my-db": {"condition": "started"}}
    assert has_line(report, "services.my.db", "renamed to component 'my-db'")


def test_name_clash_after_sanitizing_is_reported(tmp_path):
    model, report = convert_text(tmp_path, """
        services:
          web_app: {image: "web:1"}
          web-app: {image: "web:2"}
    """)
    assert list(model["components"]) == ["web-app"]
    assert model["components"]["web-app"]["image"] == "web:1"
    assert has_line(report, "services.web-app", "already taken by service 'web_app'; skipped")


def test_project_name_and_port_clash(tmp_path):
    model, report = convert_text(tmp_path, """
        name: other
        services:
          a:
            image: a:1
            ports: ["8080:80", "9090:80", {target: 81, published: "7000-7001"}]
    """)
    assert model["components"]["a"]["ports"] == [{"port": 80, "publish": 8080}, 81]
    assert has_line(report, "name", "compose project name 'other' not used; the application is named 'app'")
    assert has_line(report, "services.a.ports[1]", "already published on host port 8080")
    assert has_line(report, "services.a.ports[2]", "host port '7000-7001' is not a single port")


def test_deploy_replicas_and_bad_limits(tmp_path):
    model, report = convert_text(tmp_path, """
        services:
          a:
            image: a:1
            deploy:
              replicas: 0
              resources: {limits: {cpus: "lots", memory: "1.5g", pids: 100}}
    """)
    assert "replicas" not in model["components"]["a"] and "resources" not in model["components"]["a"]
    assert has_line(report, "services.a.deploy.replicas", "at least 1")
    assert has_line(report, "services.a.deploy.resources.limits.cpus", "not a positive CPU count")
    assert has_line(report, "services.a.deploy.resources.limits.memory", "not a memory size")
    assert has_line(report, "services.a.deploy.resources.limits.pids", "cpus and memory only")


def test_configs_missing_and_undefined(tmp_path):
    model, report = convert_text(tmp_path, """
        services:
          a:
            image: a:1
            configs: [gone, undefined]
        configs:
          gone: {file: ./gone.conf}
    """)
    assert "config_files" not in model["components"]["a"]
    assert has_line(report, "configs.gone", "file ./gone.conf not found")
    assert has_line(report, "services.a.configs[1]", "not defined under top-level configs")


def test_fatal_inputs():
    with pytest.raises(ComposeError, match="a compose file is a mapping"):
        from_compose(["x"], name="a", version="1.0.0", base_dir=pathlib.Path("."))
    with pytest.raises(ComposeError, match="no services"):
        from_compose({"services": {}}, name="a", version="1.0.0", base_dir=pathlib.Path("."))
    with pytest.raises(ComposeError, match=r"image: invalid image reference 'Bad Image:1'"):
        from_compose({"services": {"a": {"image": "Bad Image:1"}}}, name="a", version="1.0.0",
                     base_dir=pathlib.Path("."))
    with pytest.raises(ComposeError, match=r"version: 'v1' is not a semantic version"):
        from_compose({"services": {"a": {"image": "a:1"}}}, name="a", version="v1", base_dir=pathlib.Path("."))


def test_fixture_tree_copied_elsewhere_converts_the_same(tmp_path):
    """base_dir, not the working directory, anchors every relative path."""
    copy = tmp_path / "shop"
    shutil.copytree(FIXTURES / "shop", copy)
    model_here, report_here = convert("shop", name="shop")
    model_there, report_there = convert("", name="shop", base_dir=copy)
    assert model_here == model_there
    assert [line for line in report_here if "not found under" not in line] == report_there


def test_a_service_name_in_command_or_entrypoint_arguments_is_reported(tmp_path: pathlib.Path) -> None:
    """Under compose `--db db` resolves the service by name; on systemd and Kubernetes it does not (issue 20,
    item 5): the argument is reported like an env value that names a service."""
    from bundle_builder.compose import from_compose
    compose = {"services": {
        "db": {"image": "x/db:1"}, "cache": {"image": "x/cache:1"},
        "worker": {"image": "x/worker:1", "command": ["--db", "db", "--cache=cache", "--mode", "db-less"],
                   "entrypoint": ["/app", "redis://cache:6379/0"]}}}
    _model, report = from_compose(compose, name="votes", version="1.0.0", base_dir=tmp_path)
    flagged = sorted(line.split(":", 1)[0] for line in report if "refers to service host name" in line)
    assert flagged == ["services.worker.command[1]", "services.worker.command[2]", "services.worker.entrypoint[1]"], report


# ------------------------------------------------------------------------------------ one-shot jobs (issue #20)

POLL = pathlib.Path(__file__).resolve().parents[2] / "examples" / "poll"


def test_poll_example_converts_with_a_job_replicas_and_exports():
    """examples/poll, the parity suite's app, as its users convert it: migrate becomes a job the others wait for,
    the workers keep their replicas, service host names become exports, the secret a 0400 file, the reports
    profile an optional module that is off."""
    model, report = convert("", name="poll", version="1.0.0", base_dir=POLL)
    comps = model["components"]
    assert list(comps) == ["db", "redis", "migrate", "worker", "web", "tally"]
    assert model["modules"] == {"reports": {"components": ["tally"], "default": False,
                                            "description": "compose profile reports"}}
    assert comps["tally"]["volumes"] == [{"name": "tally", "path": "/var/lib/poll-tally"}]
    migrate = comps["migrate"]
    assert migrate["kind"] == "job" and migrate["command"] == ["migrate"]
    assert not {"ports", "health", "replicas", "exports", "volumes"} & set(migrate)
    for name in ("web", "worker"):
        assert comps[name]["depends_on"] == {"db": {"condition": "healthy"}, "migrate": {"condition": "completed"},
                                             "redis": {"condition": "healthy"}}
        assert comps[name]["image"] == "poll/app:1.0.0", "POLL_VERSION defaults to 1.0.0 without a .env"
    assert comps["worker"]["replicas"] == 2 and "ports" not in comps["worker"]
    assert comps["worker"]["health"]["exec"] == ["python3", "/opt/poll/poll.py", "check-worker"]
    assert comps["web"]["ports"] == [{"port": 8090, "publish": 8090}]
    assert comps["db"]["exports"] == {"DB_HOST": "${host}"} and comps["redis"]["exports"] == {"REDIS_HOST": "${host}"}
    for name in ("migrate", "worker", "web", "tally"):
        assert "DB_HOST" not in comps[name]["env"], name
        assert {"path": "/run/secrets/db_password", "content": "${secrets.db_password}", "mode": "0400"} in \
            comps[name]["config_files"]
    init = next(c for c in comps["db"]["config_files"] if c["path"].startswith("/docker-entrypoint-initdb.d/"))
    assert init["content"] == (POLL / "db" / "init.sql").read_text()
    assert comps["db"]["health"]["exec"][:3] == ["/usr/lib/postgresql/15/bin/pg_isready", "-h", "/tmp"]
    loaded = load_model(model)
    assert start_order(loaded) == [["db", "redis"], ["migrate"], ["tally", "web", "worker"]]
    assert has_line(report, "services.migrate", "converted to a job (kind: job): tally, web and worker wait for it")
    assert has_line(report, "services.web.environment.REDIS_HOST", "converted to an export of redis")
    assert not lines_for(report, "services.migrate.restart"), "restart: 'no' is what a job is: nothing to report"


def test_poll_release_is_chosen_by_dotenv(tmp_path):
    shutil.copytree(POLL, tmp_path / "poll", ignore=shutil.ignore_patterns("secrets", ".env"))
    (tmp_path / "poll" / ".env").write_text("POLL_VERSION=1.1.0\n")
    model, report = convert("", name="poll", version="1.1.0", base_dir=tmp_path / "poll")
    assert {model["components"][n]["image"] for n in ("migrate", "worker", "web")} == {"poll/app:1.1.0"}
    assert has_line(report, ".env", "substituted from .env: POLL_VERSION")


JOB_COMPOSE = """
    services:
      db: {image: "db:1"}
      migrate:
        image: "app:1"
        restart: %s
        ports: ["9000"]
        healthcheck: {test: ["CMD", "true"]}
        deploy: {replicas: 3}
        depends_on: [db]
      web:
        image: "app:1"
        depends_on:
          migrate: {condition: service_completed_successfully}
      cron:
        image: "app:1"
        depends_on:
          migrate: {condition: service_healthy}
"""


@pytest.mark.parametrize("restart", ['"no"', "on-failure", '"on-failure:3"', "always", "unless-stopped"])
def test_a_service_waited_for_with_completed_becomes_a_job(tmp_path, restart):
    model, report = convert_text(tmp_path, JOB_COMPOSE % restart)
    migrate = model["components"]["migrate"]
    assert migrate == {"kind": "job", "image": "app:1", "depends_on": {"db": {"condition": "started"}}}
    assert model["components"]["web"]["depends_on"] == {"migrate": {"condition": "completed"}}
    # every dependency on a job waits for completion, whatever compose said; the report says so
    assert model["components"]["cron"]["depends_on"] == {"migrate": {"condition": "completed"}}
    assert has_line(report, "services.cron.depends_on.migrate", "service_healthy converted to completed")
    for key in ("ports", "healthcheck", "deploy.replicas"):
        assert has_line(report, "services.migrate." + key, "dropped:"), (key, report)
    plain = restart.strip('"')
    if plain in ("always", "unless-stopped"):
        assert has_line(report, "services.migrate", "restart: %s, which disagrees" % plain)
        assert has_line(report, "services.migrate.restart", "disagrees with dependents waiting for completion")
    elif plain.startswith("on-failure"):
        assert has_line(report, "services.migrate.restart", "a failed job is not retried")
    else:
        assert not lines_for(report, "services.migrate.restart")


def test_a_waited_for_service_with_volumes_stays_a_service(tmp_path):
    model, report = convert_text(tmp_path, """
        services:
          seed:
            image: "seed:1"
            restart: "no"
            volumes: ["data:/data"]
          web:
            image: "web:1"
            depends_on: {seed: {condition: service_completed_successfully}}
        volumes: {data: {}}
    """)
    assert "kind" not in model["components"]["seed"]
    assert model["components"]["web"]["depends_on"] == {"seed": {"condition": "started"}}
    assert has_line(report, "services.seed", "keeps volumes, which a job cannot have: kept as a service")
    assert has_line(report, "services.web.depends_on.seed", "service_completed_successfully converted to started")


def test_a_one_shot_nobody_waits_for_stays_a_service_with_a_hint(tmp_path):
    model, report = convert_text(tmp_path, """
        services:
          backup: {image: "backup:1", restart: "no"}
          web: {image: "web:1", restart: always}
    """)
    assert "kind" not in model["components"]["backup"]
    assert has_line(report, "services.backup.restart", "condition: service_completed_successfully and it becomes a job")
    assert has_line(report, "services.web.restart", "the product restarts failed components itself")


def test_host_names_stay_in_env_when_an_export_would_clash_or_cannot_reach(tmp_path):
    model, report = convert_text(tmp_path, """
        services:
          primary: {image: "db:1"}
          replica: {image: "db:1"}
          api:
            image: "api:1"
            environment: {DB_HOST: primary, READ_HOST: replica}
            depends_on: [primary, replica]
          report:
            image: "api:1"
            environment: {DB_HOST: replica}
            depends_on: [replica]
          lonely:
            image: "api:1"
            environment: {DB_HOST: primary}
    """)
    comps = model["components"]
    # DB_HOST would be exported by both primary and replica into api: left as it was, reported
    assert comps["api"]["env"] == {"DB_HOST": "primary"} and comps["replica"]["exports"] == {"READ_HOST": "${host}"}
    assert comps["report"]["env"] == {"DB_HOST": "replica"}
    assert has_line(report, "services.api.environment.DB_HOST", "only resolves under compose")
    # lonely does not depend on primary: exports reach direct dependents only
    assert comps["lonely"]["env"] == {"DB_HOST": "primary"} and "exports" not in comps["primary"]
    load_model(model)


def test_profiles_become_optional_modules(tmp_path):
    """A profiled service is inactive unless its profile is named; a module is off unless the site turns it on.
    A service in several profiles joins the first (a component belongs to one module), noted."""
    model, report = convert_text(tmp_path, """
services:
  web: {image: "web:1"}
  report: {image: "report:1", profiles: [reports], depends_on: [web]}
  report-ui: {image: "report-ui:1", profiles: [reports, ui], depends_on: [report]}
  debug: {image: "debug:1", profiles: [Debug_Tools]}
""")
    assert model["modules"] == {
        "reports": {"components": ["report", "report-ui"], "default": False, "description": "compose profile reports"},
        "debug-tools": {"components": ["debug"], "default": False, "description": "compose profile Debug_Tools"}}
    assert has_line(report, "services.report-ui.profiles", "in module reports only (a component belongs to one "
                                                           "module): profiles ui not converted")
    assert has_line(report, "profiles", "module reports (off unless the site turns it on: app_modules: "
                                        "{reports: true}): report, report-ui")
    loaded = load_model(model)
    assert select_modules(loaded, {})[1] == {"debug-tools": False, "reports": False}
    assert set(select_modules(loaded, {"reports": True})[0]["components"]) == {"web", "report", "report-ui"}
