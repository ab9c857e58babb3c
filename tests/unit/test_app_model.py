"""Unit tests for plugins/module_utils/app/model.py (the app.yml model)."""

from __future__ import annotations

import copy
import json
import re
import string

import pytest

from offline_delivery_core.app import model as app_model
from offline_delivery_core.app.model import (
    ModelError,
    diff_models,
    dump_model,
    effective_env,
    generate_secret,
    image_refs,
    interpolate,
    load_model,
    render_config,
    select_modules,
    start_order,
)

SHOP = {
    "apiVersion": "offline.delivery/v1",
    "kind": "Application",
    "name": "shop",
    "version": "1.0.0",
    "description": "A small shop",
    "secrets": {"db_password": {"length": 32, "charset": "alphanumeric"}},
    "components": {
        "gateway": {
            "image": "shop/gateway:1.0.0",
            "ports": [{"name": "http", "port": 8080, "publish": 8080}],
            "config_files": [{
                "path": "/etc/nginx/conf.d/shop.conf",
                "content": "server {\n  listen 8080;\n  location /api/ { proxy_pass http://${env.API_HOST}:${env.API_PORT}/; }\n}\n",
            }],
            "health": {"http": {"port": 8080, "path": "/healthz"}},
            "depends_on": {"api": {"condition": "healthy"}},
        },
        "api": {
            "image": "shop/api:1.0.0",
            "ports": [8000],
            "env": {"SHOP_CURRENCY": "EUR", "WORKERS": 4, "DEBUG": False, "RATIO": 0.5},
            "health": {"http": {"port": 8000, "path": "/healthz"}, "interval": "5s", "timeout": "2s",
                       "retries": 12, "start_period": "1m"},
            "depends_on": ["db", "redis"],
            "exports": {"API_HOST": "${host}", "API_PORT": "8000"},
        },
        "db": {
            "image": "shop/db:1.0.0",
            "ports": [{"name": "pg", "port": 5432}],
            "env": {"POSTGRES_PASSWORD": "${secrets.db_password}"},
            "volumes": [{"name": "pgdata", "path": "/var/lib/postgresql/data"}],
            "health": {"tcp": {"port": 5432}},
            "resources": {"cpus": "1", "memory": "512Mi"},
            "placement": {"group": "db_hosts"},
            "user": "999:999",
            "exports": {"DB_HOST": "${host}", "DB_PORT": "5432", "DB_PASSWORD": "${secrets.db_password}"},
        },
        "redis": {
            "image": "shop/redis:1.0.0",
            "command": ["redis-server", "--save", ""],
            "ports": [6379],
            "health": {"exec": ["redis-cli", "ping"]},
            "exports": {"REDIS_HOST": "${host}", "REDIS_PORT": "6379"},
        },
    },
}


def shop() -> dict:
    return copy.deepcopy(SHOP)


def errors_of(data: object) -> list[tuple[str, str]]:
    with pytest.raises(ModelError) as info:
        load_model(data)
    return info.value.errors


def assert_error(data: object, path: str, pattern: str) -> None:
    """The model is refused with an error at exactly ``path`` whose message matches ``pattern``."""
    errors = errors_of(data)
    matching = [m for p, m in errors if p == path]
    assert matching, "no error at %s; errors: %s" % (path, errors)
    assert any(re.search(pattern, m) for m in matching), "messages at %s: %s" % (path, matching)


# ------------------------------------------------------------------------------------ normalisation

def test_shop_normalises_with_defaults():
    model = load_model(shop())
    api = model["components"]["api"]
    assert api["replicas"] == 1
    assert api["ports"] == [{"name": "port-8000", "port": 8000, "protocol": "tcp", "publish": None}]
    assert api["env"] == {"SHOP_CURRENCY": "EUR", "WORKERS": "4", "DEBUG": "false", "RATIO": "0.5"}
    assert api["depends_on"] == {"db": {"condition": "started"}, "redis": {"condition": "started"}}
    assert api["health"] == {"http": {"port": 8000, "path": "/healthz"}, "interval": 5, "timeout": 2,
                             "retries": 12, "start_period": 60}
    assert api["entrypoint"] is None and api["command"] is None and api["user"] is None
    assert api["resources"] == {"cpus": None, "memory": None}
    assert api["placement"] == {"group": None}
    redis = model["components"]["redis"]
    assert redis["health"] == {"exec": ["redis-cli", "ping"], "interval": 10, "timeout": 5, "retries": 3,
                               "start_period": 0}
    assert model["components"]["gateway"]["config_files"][0]["mode"] == "0644"
    assert model["components"]["gateway"]["depends_on"] == {"api": {"condition": "healthy"}}
    assert model["secrets"] == {"db_password": {"length": 32, "charset": "alphanumeric"}}


def test_defaults_for_minimal_model_and_secret():
    model = load_model({"apiVersion": "offline.delivery/v1", "kind": "Application", "name": "a", "version": "0.1.0",
                        "secrets": {"token": None}, "components": {"web": {"image": "web:1"}}})
    assert model["description"] == ""
    assert model["secrets"]["token"] == {"length": 32, "charset": "alphanumeric"}
    web = model["components"]["web"]
    assert web["ports"] == [] and web["env"] == {} and web["volumes"] == [] and web["health"] is None
    assert web["depends_on"] == {} and web["exports"] == {} and web["config_files"] == []


def test_normalised_form_is_a_fixed_point_and_json_ready():
    model = load_model(shop())
    dumped = dump_model(model)
    assert dumped == model and dumped is not model
    dumped["components"]["api"]["env"]["X"] = "1"
    assert "X" not in model["components"]["api"]["env"]  # a deep copy
    assert load_model(json.loads(json.dumps(dump_model(model), sort_keys=True))) == model


def test_input_is_not_modified():
    data = shop()
    load_model(data)
    assert data == SHOP


def test_durations_in_all_forms():
    for raw, seconds in (("30s", 30), ("1m30s", 90), ("2h", 7200), (15, 15), ("1h1m1s", 3661)):
        data = shop()
        data["components"]["api"]["health"]["interval"] = raw
        data["components"]["api"]["health"]["timeout"] = 1
        assert load_model(data)["components"]["api"]["health"]["interval"] == seconds


def test_image_references_accepted():
    for ref in ("shop/api:1.0.0", "registry.local:5000/shop/api:1.0.0", "localhost/x:y",
                "a/b__c/d-e.f:Tag_1.0-rc", "[::1]:5000/app:1", "postgres@sha256:" + "a" * 64,
                "ghcr.io/org/app:2.1@sha256:" + "0123456789abcdef" * 4):
        data = shop()
        data["components"]["api"]["image"] = ref
        assert load_model(data)["components"]["api"]["image"] == ref


# ------------------------------------------------------------------------------------ top-level errors

def test_not_a_mapping():
    assert errors_of(["x"]) == [("", "expected a mapping (the application model), got list")]


def test_api_version_and_kind():
    data = shop()
    data["apiVersion"] = "v1"
    del data["kind"]
    assert_error(data, "apiVersion", r"expected 'offline.delivery/v1', got 'v1'")
    assert_error(data, "kind", r"expected 'Application', got None")


@pytest.mark.parametrize("name", ["Shop", "-shop", "shop-", "sh_op", "a" * 41, ""])
def test_bad_app_name(name):
    data = shop()
    data["name"] = name
    assert_error(data, "name", r"invalid application name .*lowercase letters, digits and '-'.*at most 40")


def test_name_must_be_a_string():
    data = shop()
    data["name"] = 12
    assert_error(data, "name", r"expected a string, got integer \(quote it in YAML\)")


@pytest.mark.parametrize("version", ["1.0", "v1.0.0", "01.0.0", "1.0.0-", "1.0.0+", "1.0.0-01"])
def test_bad_semver(version):
    data = shop()
    data["version"] = version
    assert_error(data, "version", r"is not a semantic version")


@pytest.mark.parametrize("version", ["1.0.0-rc.1", "2.0.0+build.5", "1.2.3-alpha.1+sha.abc", "0.0.0"])
def test_good_semver(version):
    data = shop()
    data["version"] = version
    assert load_model(data)["version"] == version


def test_float_version_asks_for_quotes():
    data = shop()
    data["version"] = 1.0
    assert_error(data, "version", r"expected a string, got number \(quote it in YAML\)")


def test_missing_required_top_fields():
    errors = dict(errors_of({"apiVersion": "offline.delivery/v1", "kind": "Application"}))
    assert "required" in errors["name"] and "required" in errors["version"] and "required" in errors["components"]


def test_empty_components():
    data = shop()
    data["components"] = {}
    assert_error(data, "components", r"at least one component is required")


# ------------------------------------------------------------------------------------ unknown fields

@pytest.mark.parametrize("where, path", [
    ((), "extra"),
    (("components", "api"), "components.api.extra"),
    (("components", "api", "health"), "components.api.health.extra"),
    (("components", "api", "health", "http"), "components.api.health.http.extra"),
    (("components", "db", "ports", 0), "components.db.ports[0].extra"),
    (("components", "db", "volumes", 0), "components.db.volumes[0].extra"),
    (("components", "db", "resources"), "components.db.resources.extra"),
    (("components", "db", "placement"), "components.db.placement.extra"),
    (("components", "gateway", "depends_on", "api"), "components.gateway.depends_on.api.extra"),
    (("components", "gateway", "config_files", 0), "components.gateway.config_files[0].extra"),
    (("secrets", "db_password"), "secrets.db_password.extra"),
])
def test_unknown_fields_everywhere(where, path):
    data = shop()
    node = data
    for key in where:
        node = node[key]
    node["extra"] = 1
    assert_error(data, path, r"unknown field 'extra'; allowed fields here: ")


def test_unknown_field_lists_allowed():
    data = shop()
    data["components"]["api"]["imagee"] = "x"
    assert_error(data, "components.api.imagee", r"allowed fields here: image, description, entrypoint, command")


def test_all_errors_collected_and_str_lists_them_with_source():
    data = shop()
    data["version"] = "one"
    data["components"]["api"]["replicas"] = 0
    data["components"]["db"]["image"] = "Shop/DB"
    with pytest.raises(ModelError) as info:
        load_model(data, source="examples/shop/app.yml")
    paths = [p for p, _ in info.value.errors]
    assert {"version", "components.api.replicas", "components.db.image"} <= set(paths)
    lines = str(info.value).splitlines()
    assert len(lines) == len(info.value.errors)
    assert all(line.startswith("examples/shop/app.yml: ") for line in lines)
    assert "examples/shop/app.yml: components.api.replicas: expected an integer >= 1, got 0" in lines
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------------ components

@pytest.mark.parametrize("name", ["API", "a_b", "-a", "x" * 41])
def test_bad_component_name(name):
    data = shop()
    data["components"][name] = {"image": "x:1"}
    assert_error(data, "components." + name, r"invalid component name")


def test_image_required():
    data = shop()
    del data["components"]["api"]["image"]
    assert_error(data, "components.api.image", r"required: an image reference")


@pytest.mark.parametrize("ref, pattern", [
    ("shop/api", r"has no tag or digest: add one"),
    ("shop/API:1", r"invalid image reference .*lowercase path"),
    ("shop//api:1", r"invalid image reference"),
    ("shop/api:", r"invalid image reference"),
    ("shop/api:-bad", r"invalid image reference"),
    ("shop/api@sha256:abc", r"invalid image reference"),
    ("shop/api@md5:" + "a" * 32, r"must be sha256:<64 lowercase hex digits>"),
    ("shop/api:1 ", r"invalid image reference"),
    ("a" * 256 + ":1", r"longer than 255"),
])
def test_bad_image_references(ref, pattern):
    data = shop()
    data["components"]["api"]["image"] = ref
    assert_error(data, "components.api.image", pattern)


@pytest.mark.parametrize("field, value, pattern", [
    ("command", "redis-server --save", r"expected a list of strings \(argv\), got string"),
    ("entrypoint", [["x"]], r"expected a string, got list"),
    ("replicas", "2", r"expected an integer >= 1, got '2'"),
    ("replicas", True, r"expected an integer >= 1, got True"),
    ("user", "root user", r"expected a user as 'name', 'uid' or 'uid:gid'"),
    ("ports", {"port": 1}, r"expected a list of ports, got mapping"),
    ("env", ["A=1"], r"expected a mapping of NAME: value, got list"),
])
def test_component_field_types(field, value, pattern):
    data = shop()
    data["components"]["redis"][field] = value
    path = "components.redis." + field + ("[0]" if field == "entrypoint" else "")
    assert_error(data, path, pattern)


def test_user_number_becomes_string():
    data = shop()
    data["components"]["redis"]["user"] = 999
    assert load_model(data)["components"]["redis"]["user"] == "999"


# ------------------------------------------------------------------------------------ ports

@pytest.mark.parametrize("port", [0, 65536, -1, "80", 80.0])
def test_port_range(port):
    data = shop()
    data["components"]["db"]["ports"] = [{"name": "pg", "port": port}]
    assert_error(data, "components.db.ports[0].port", r"expected a port number 1-65535")


def test_port_duplicate_in_component():
    data = shop()
    data["components"]["api"]["ports"] = [8000, {"name": "again", "port": 8000}]
    assert_error(data, "components.api.ports[1].port", r"port 8000/tcp is already declared at components.api.ports\[0\]")


def test_same_number_tcp_and_udp_is_allowed():
    data = shop()
    data["components"]["api"]["ports"] = [8000, {"port": 8000, "protocol": "udp"}]
    names = [p["name"] for p in load_model(data)["components"]["api"]["ports"]]
    assert names == ["port-8000", "port-8000-udp"]


def test_port_protocol_publish_and_name():
    data = shop()
    data["components"]["db"]["ports"] = [{"name": "PG", "port": 5432, "protocol": "sctp", "publish": 70000}]
    assert_error(data, "components.db.ports[0].protocol", r"expected one of tcp, udp, got 'sctp'")
    assert_error(data, "components.db.ports[0].publish", r"expected a port number 1-65535, got 70000")
    assert_error(data, "components.db.ports[0].name", r"invalid port name 'PG'")


def test_duplicate_port_name():
    data = shop()
    data["components"]["api"]["ports"] = [{"name": "web", "port": 8000}, {"name": "web", "port": 8001}]
    assert_error(data, "components.api.ports[1].name", r"port name 'web' is already used")


def test_published_port_unique_in_app():
    data = shop()
    data["components"]["api"]["ports"] = [{"port": 8000, "publish": 8080}]
    assert_error(data, "components.api.ports[0].publish", r"host port 8080/tcp is already published by gateway")


# ------------------------------------------------------------------------------------ env and references

@pytest.mark.parametrize("key", ["1A", "A-B", "A B", ""])
def test_bad_env_key(key):
    data = shop()
    data["components"]["api"]["env"] = {key: "x"}
    assert_error(data, "components.api.env." + key, r"invalid variable name .*\[A-Za-z_\]\[A-Za-z0-9_\]\*")


@pytest.mark.parametrize("value, label", [("a\nB=2", "a newline"), ("a\rb", "a carriage return"),
                                          ("a\x00b", "a NUL byte")])
def test_env_injection_refused(value, label):
    data = shop()
    data["components"]["api"]["env"] = {"X": value}
    assert_error(data, "components.api.env.X", "contains %s, which would break" % label)
    data = shop()
    data["components"]["db"]["exports"]["DB_PORT"] = value
    assert_error(data, "components.db.exports.DB_PORT", "contains %s" % label)


def test_env_value_types():
    data = shop()
    data["components"]["api"]["env"] = {"A": None, "B": ["x"], "C": True, "D": 3}
    assert_error(data, "components.api.env.A", r"expected a string, number or boolean, got null")
    assert_error(data, "components.api.env.B", r"expected a string, number or boolean, got list")


def test_undeclared_secret_reference():
    data = shop()
    data["components"]["api"]["env"] = {"TOKEN": "Bearer ${secrets.api_token}"}
    assert_error(data, "components.api.env.TOKEN",
                 r"\$\{secrets.api_token\} names an undeclared secret; declared secrets: db_password")


def test_host_only_in_exports():
    data = shop()
    data["components"]["api"]["env"] = {"ME": "${host}"}
    assert_error(data, "components.api.env.ME", r"\$\{host\} is not allowed here; it may only appear in exports")
    data = shop()
    data["components"]["gateway"]["config_files"][0]["content"] = "${host}"
    assert_error(data, "components.gateway.config_files[0].content", r"\$\{host\} is not allowed here")


def test_env_ref_only_in_config_files():
    data = shop()
    data["components"]["api"]["env"] = {"X": "${env.SHOP_CURRENCY}"}
    assert_error(data, "components.api.env.X", r"\$\{env.SHOP_CURRENCY\} is not allowed here; it may only "
                 r"appear in config file content")
    data = shop()
    data["components"]["db"]["exports"]["DB_URL"] = "${env.POSTGRES_PASSWORD}"
    assert_error(data, "components.db.exports.DB_URL", r"not allowed here")


def test_env_ref_must_name_known_variable():
    data = shop()
    data["components"]["gateway"]["config_files"][0]["content"] = "${env.API_HOSTNAME}"
    assert_error(data, "components.gateway.config_files[0].content",
                 r"\$\{env.API_HOSTNAME\} names no env variable of this component .*API_HOST, API_PORT")


@pytest.mark.parametrize("text, pattern", [
    ("${foo}", r"unknown reference '\$\{foo\}'"),
    ("${secrets}", r"unknown reference"),
    ("${ secrets.db_password }", r"unknown reference"),
    ("${secrets.bad-name}", r"invalid name 'bad-name'"),
    ("${{ x }}", r"unknown reference"),
    ("abc ${secrets.db_password", r"unterminated reference"),
])
def test_malformed_references(text, pattern):
    data = shop()
    data["components"]["api"]["env"] = {"X": text}
    assert_error(data, "components.api.env.X", pattern)


def test_literal_dollar_brace_and_jinja_are_accepted():
    data = shop()
    data["components"]["api"]["env"] = {"A": "$${HOME}", "B": "{{ x }}", "C": "$HOME and $ and $$", "D": "{% if %}"}
    assert load_model(data)["components"]["api"]["env"]["A"] == "$${HOME}"  # kept; resolved at interpolation


# ------------------------------------------------------------------------------------ config files

@pytest.mark.parametrize("path, pattern", [
    ("etc/x.conf", r"is not absolute"),
    ("/etc/../x.conf", r"contains '\.\.'"),
    ("/etc//x.conf", r"is not normalised: write '/etc/x.conf'"),
    ("/etc/./x.conf", r"is not normalised"),
    ("/etc/x/", r"is not normalised"),
    ("/", r"'/' is not allowed"),
])
def test_config_file_path(path, pattern):
    data = shop()
    data["components"]["gateway"]["config_files"][0]["path"] = path
    assert_error(data, "components.gateway.config_files[0].path", pattern)


def test_config_file_mode_and_content():
    data = shop()
    files = data["components"]["gateway"]["config_files"]
    files.append({"path": "/a", "content": "x", "mode": 420})
    files.append({"path": "/b", "mode": "0600"})
    files.append({"path": "/c", "content": "x", "mode": "0999"})
    files.append({"path": "/a", "content": "y"})
    assert_error(data, "components.gateway.config_files[1].mode", r"quoted string such as '0644'")
    assert_error(data, "components.gateway.config_files[2].content", r"required")
    assert_error(data, "components.gateway.config_files[3].mode", r"octal mode")
    assert_error(data, "components.gateway.config_files[4].path", r"/a is already declared at")


def test_config_file_content_keeps_newlines_and_short_mode():
    data = shop()
    data["components"]["gateway"]["config_files"].append({"path": "/etc/y", "content": "a\nb\n", "mode": "600"})
    cfg = load_model(data)["components"]["gateway"]["config_files"][1]
    assert cfg == {"path": "/etc/y", "content": "a\nb\n", "mode": "0600"}


# ------------------------------------------------------------------------------------ volumes

def test_volume_checks():
    data = shop()
    data["components"]["db"]["volumes"] += [{"name": "logs", "path": "var/log"}, {"name": "Bad_", "path": "/x"},
                                            {"name": "other", "path": "/var/lib/postgresql/data"}]
    data["components"]["api"]["volumes"] = [{"name": "pgdata", "path": "/data"}]
    assert_error(data, "components.db.volumes[1].path", r"is not absolute")
    assert_error(data, "components.db.volumes[2].name", r"invalid volume name")
    assert_error(data, "components.db.volumes[3].path", r"already mounted at components.db.volumes\[0\]")
    errors = errors_of(data)
    assert any(p in ("components.api.volumes[0].name", "components.db.volumes[0].name")
               and "already used by component" in m for p, m in errors)


# ------------------------------------------------------------------------------------ health

def test_health_exactly_one_kind():
    data = shop()
    data["components"]["db"]["health"] = {"tcp": {"port": 5432}, "exec": ["true"]}
    assert_error(data, "components.db.health", r"exactly one of http, tcp, exec is required, got tcp, exec")
    data["components"]["db"]["health"] = {"interval": "5s"}
    assert_error(data, "components.db.health", r"got none")


def test_health_probe_fields():
    data = shop()
    data["components"]["api"]["health"] = {"http": {"port": 80000, "path": "healthz"}}
    assert_error(data, "components.api.health.http.port", r"expected a port number 1-65535, got 80000")
    assert_error(data, "components.api.health.http.path", r"starting with '/'")
    data["components"]["api"]["health"] = {"http": {"port": 9000}}
    assert_error(data, "components.api.health.http.port", r"port 9000 is not one of the component's tcp ports \(8000\)")
    data["components"]["api"]["health"] = {"exec": []}
    assert_error(data, "components.api.health.exec", r"non-empty list")
    data["components"]["api"]["health"] = {"exec": "curl localhost"}
    assert_error(data, "components.api.health.exec", r"expected a list of strings")


@pytest.mark.parametrize("field, value, pattern", [
    ("interval", "5 s", r"expected a duration such as 5s"),
    ("interval", "0s", r"must be at least 1s"),
    ("timeout", "1d", r"expected a duration"),
    ("start_period", -1, r"expected a duration"),
    ("retries", 0, r"expected an integer >= 1"),
    ("timeout", "1m", r"timeout \(60s\) is longer than interval \(5s\)"),
])
def test_health_timing(field, value, pattern):
    data = shop()
    data["components"]["api"]["health"][field] = value
    assert_error(data, "components.api.health." + field, pattern)


# ------------------------------------------------------------------------------------ resources, placement

@pytest.mark.parametrize("field, value", [("cpus", "half"), ("cpus", "0"), ("cpus", "0.12345"), ("cpus", -1),
                                          ("memory", "1GB"), ("memory", "0Mi"), ("memory", 512), ("memory", "1.5Gi")])
def test_bad_resources(field, value):
    data = shop()
    data["components"]["db"]["resources"] = {field: value}
    assert_error(data, "components.db.resources." + field, r"expected a (positive number of CPUs|memory quantity)")


def test_resources_normalised():
    data = shop()
    data["components"]["db"]["resources"] = {"cpus": 0.5, "memory": "1Gi"}
    assert load_model(data)["components"]["db"]["resources"] == {"cpus": "0.5", "memory": "1Gi"}
    assert app_model.parse_memory("256Mi") == 256 * 2**20 and app_model.parse_memory("512M") == 512 * 10**6


@pytest.mark.parametrize("group", ["db-hosts", "1db", "", 5])
def test_bad_placement_group(group):
    data = shop()
    data["components"]["db"]["placement"] = {"group": group}
    assert_error(data, "components.db.placement.group", r"invalid inventory group name")


# ------------------------------------------------------------------------------------ secrets

@pytest.mark.parametrize("spec, path, pattern", [
    ({"length": 7}, "secrets.db_password.length", r"expected an integer 8-256, got 7"),
    ({"length": 257}, "secrets.db_password.length", r"got 257"),
    ({"length": "32"}, "secrets.db_password.length", r"got '32'"),
    ({"charset": "ascii"}, "secrets.db_password.charset", r"expected one of alphanumeric, hex, base64url"),
    ("x", "secrets.db_password", r"expected a mapping \{length, charset\}"),
])
def test_bad_secret_specs(spec, path, pattern):
    data = shop()
    data["secrets"]["db_password"] = spec
    errors = errors_of(data)
    assert any(p == path and re.search(pattern, m) for p, m in errors), errors
    # the references to the (declared, badly specified) secret are not reported on top
    assert not any("undeclared secret" in m for _, m in errors)


def test_bad_secret_name():
    data = shop()
    data["secrets"]["db-password"] = {}
    assert_error(data, "secrets.db-password", r"invalid secret name")


# ------------------------------------------------------------------------------------ dependencies

def test_missing_dependency():
    data = shop()
    data["components"]["api"]["depends_on"] = ["db", "cache"]
    assert_error(data, "components.api.depends_on.cache",
                 r"depends on 'cache', which is not a component; components: api, db, gateway, redis")


def test_self_dependency():
    data = shop()
    data["components"]["db"]["depends_on"] = ["db"]
    assert_error(data, "components.db.depends_on.db", r"cannot depend on itself")


def test_dependency_cycle_named():
    data = shop()
    data["components"]["db"]["depends_on"] = {"gateway": None}
    assert_error(data, "components.api.depends_on", r"^dependency cycle: api -> db -> gateway -> api$")


def test_two_node_cycle():
    data = shop()
    data["components"]["redis"]["depends_on"] = ["api"]
    assert_error(data, "components.api.depends_on", r"^dependency cycle: api -> redis -> api$")


def test_bad_condition_and_forms():
    data = shop()
    data["components"]["gateway"]["depends_on"] = {"api": {"condition": "service_healthy"}}
    assert_error(data, "components.gateway.depends_on.api.condition", r"expected one of started, healthy")
    data["components"]["gateway"]["depends_on"] = "api"
    assert_error(data, "components.gateway.depends_on", r"expected a list of component names or a mapping")
    data["components"]["gateway"]["depends_on"] = ["api", "api"]
    assert_error(data, "components.gateway.depends_on[1]", r"listed twice")


def test_export_clash_between_dependencies():
    data = shop()
    data["components"]["redis"]["exports"]["DB_HOST"] = "${host}"
    assert_error(data, "components.api.depends_on", r"export DB_HOST is injected by both db and redis")


def test_start_order_levels_sorted():
    model = load_model(shop())
    assert start_order(model) == [["db", "redis"], ["api"], ["gateway"]]
    data = shop()
    data["components"]["worker"] = {"image": "shop/api:1.0.0", "depends_on": ["redis"]}
    data["components"]["aaa"] = {"image": "x:1"}
    assert start_order(load_model(data)) == [["aaa", "db", "redis"], ["api", "worker"], ["gateway"]]


def test_image_refs():
    assert image_refs(load_model(shop())) == {"gateway": "shop/gateway:1.0.0", "api": "shop/api:1.0.0",
                                              "db": "shop/db:1.0.0", "redis": "shop/redis:1.0.0"}


# ------------------------------------------------------------------------------------ interpolation

def test_interpolate_basics():
    secrets = {"pw": "s3cret"}
    assert interpolate("a ${secrets.pw} b", secrets=secrets) == "a s3cret b"
    assert interpolate("$${secrets.pw}", secrets=secrets) == "${secrets.pw}"
    # "$$${" is a literal "$" followed by the escape "$${"
    assert interpolate("$$${secrets.pw}", secrets=secrets) == "$${secrets.pw}"
    assert interpolate("{{ x }} {% if y %} $HOME $ $$", secrets={}) == "{{ x }} {% if y %} $HOME $ $$"
    assert interpolate("http://${host}:80", secrets={}, host="10.0.0.5") == "http://10.0.0.5:80"
    assert interpolate("${env.A}-${env.B}", secrets={}, env={"A": "1", "B": "2"}) == "1-2"


def test_interpolate_escape_sequences():
    assert interpolate("$${", secrets={}) == "${"
    assert interpolate("x$${env.A}y", secrets={}, env={"A": "1"}) == "x${env.A}y"
    assert interpolate("$${x} $${secrets.pw} ${secrets.pw}", secrets={"pw": "p"}) == "${x} ${secrets.pw} p"


def test_interpolate_does_not_reinterpret_values():
    """A value containing reference syntax (or Jinja) is inserted verbatim, never interpreted again."""
    secrets = {"pw": "${secrets.other}{{ lookup('pipe','id') }}"}
    assert interpolate("${secrets.pw}", secrets=secrets) == secrets["pw"]


def test_interpolate_errors_name_the_field():
    with pytest.raises(ModelError) as info:
        interpolate("${host}", secrets={}, field="components.api.env.X")
    assert info.value.errors == [("components.api.env.X", "${host} is only allowed in exports (it means the host "
                                  "of the exporting component)")]
    with pytest.raises(ModelError) as info:
        interpolate("${env.A} ${secrets.nope} ${bad}", secrets={}, env={}, field="f")
    messages = [m for _, m in info.value.errors]
    assert len(messages) == 3
    assert "the component has no env variable A" in messages[1] or "the component has no env variable A" in messages[0]
    assert any("no value for secret 'nope'" in m for m in messages)
    assert any("unknown reference '${bad}'" in m for m in messages)
    with pytest.raises(ModelError, match="only allowed in config file content"):
        interpolate("${env.A}", secrets={}, field="f")


def test_effective_env_injects_exports_and_resolves():
    model = load_model(shop())
    env = effective_env(model, "api", secrets={"db_password": "pw1"}, hosts={"db": "10.1.0.3", "redis": "10.1.0.4"})
    assert env == {"DB_HOST": "10.1.0.3", "DB_PORT": "5432", "DB_PASSWORD": "pw1", "REDIS_HOST": "10.1.0.4",
                   "REDIS_PORT": "6379", "SHOP_CURRENCY": "EUR", "WORKERS": "4", "DEBUG": "false", "RATIO": "0.5"}
    db_env = effective_env(model, "db", secrets={"db_password": "pw1"}, hosts={})
    assert db_env == {"POSTGRES_PASSWORD": "pw1"}


def test_effective_env_own_env_wins_then_overrides():
    data = shop()
    data["components"]["api"]["env"]["DB_PORT"] = "6432"
    model = load_model(data)
    hosts = {"db": "db", "redis": "redis"}
    env = effective_env(model, "api", secrets={"db_password": "p"}, hosts=hosts)
    assert env["DB_PORT"] == "6432"
    env = effective_env(model, "api", secrets={"db_password": "p"}, hosts=hosts,
                        overrides={"SHOP_CURRENCY": "USD", "DB_PORT": 7432, "EXTRA": "${secrets.db_password}"})
    assert (env["SHOP_CURRENCY"], env["DB_PORT"], env["EXTRA"]) == ("USD", "7432", "p")


def test_effective_env_refuses_injection_from_site_values():
    model = load_model(shop())
    with pytest.raises(ModelError) as info:
        effective_env(model, "api", secrets={"db_password": "x\nEVIL=1"}, hosts={"db": "db", "redis": "r"})
    assert info.value.errors[0][0] == "components.db.exports.DB_PASSWORD"
    assert "contains a newline" in info.value.errors[0][1]
    with pytest.raises(ModelError, match="overrides.api.X: resolved value contains a newline"):
        effective_env(model, "api", secrets={"db_password": "p"}, hosts={"db": "db", "redis": "r"},
                      overrides={"X": "a\nb"})
    with pytest.raises(ModelError, match="invalid variable name"):
        effective_env(model, "api", secrets={"db_password": "p"}, hosts={"db": "db", "redis": "r"},
                      overrides={"A=B": "x"})
    with pytest.raises(ModelError, match=r"components.db.exports.DB_HOST: .*contains a newline"):
        effective_env(model, "api", secrets={"db_password": "p"}, hosts={"db": "db\nX=1", "redis": "r"})


def test_effective_env_missing_host_and_component():
    model = load_model(shop())
    with pytest.raises(ModelError, match=r"components.api.depends_on.redis: no host given for dependency redis"):
        effective_env(model, "api", secrets={"db_password": "p"}, hosts={"db": "db"})
    with pytest.raises(ModelError, match=r"no component 'web'"):
        effective_env(model, "web", secrets={}, hosts={})


def test_render_config():
    model = load_model(shop())
    env = effective_env(model, "gateway", secrets={}, hosts={"api": "10.0.0.9"})
    text = render_config(model, "gateway", 0, env=env, secrets={})
    assert text == "server {\n  listen 8080;\n  location /api/ { proxy_pass http://10.0.0.9:8000/; }\n}\n"
    with pytest.raises(ModelError, match=r"no config file #1 \(the component has 1\)"):
        render_config(model, "gateway", 1, env=env, secrets={})


def test_render_config_with_secret_literal_and_jinja():
    data = shop()
    data["components"]["db"]["config_files"] = [{
        "path": "/etc/app.ini", "mode": "0600",
        "content": "password=${secrets.db_password}\nshell=$${HOME}\njinja={{ not_a_var }}\n"}]
    model = load_model(data)
    text = render_config(model, "db", 0, env={}, secrets={"db_password": "pw\nwith newline is fine here"})
    assert text == "password=pw\nwith newline is fine here\nshell=${HOME}\njinja={{ not_a_var }}\n"


# ------------------------------------------------------------------------------------ diff

def test_diff_models_upgrade_of_api():
    old = load_model(shop())
    data = shop()
    data["version"] = "1.1.0"
    data["description"] = "changed text"
    data["components"]["api"]["image"] = "shop/api:1.1.0"
    data["components"]["api"]["env"]["SHOP_CURRENCY"] = "USD"
    data["components"]["api"]["env"]["NEW"] = "1"
    del data["components"]["api"]["env"]["RATIO"]
    data["components"]["redis"]["description"] = "only the description"
    new = load_model(data)
    diff = diff_models(old, new)
    assert diff["added"] == [] and diff["removed"] == []
    assert diff["changed"] == {"api": ["env.NEW", "env.RATIO", "env.SHOP_CURRENCY", "image"]}
    assert diff["unchanged"] == ["db", "gateway", "redis"]
    assert diff["env_defaults"] == {"api": {"NEW": {"old": None, "new": "1"}, "RATIO": {"old": "0.5", "new": None},
                                            "SHOP_CURRENCY": {"old": "EUR", "new": "USD"}}}
    assert diff["secrets"] == {"added": [], "removed": []}


def test_diff_models_added_removed_nested_and_injected():
    old = load_model(shop())
    data = shop()
    del data["components"]["redis"]
    data["components"]["api"]["depends_on"] = ["db"]
    data["components"]["cache"] = {"image": "memcached:1.6"}
    data["components"]["db"]["exports"]["DB_PORT"] = "6432"
    data["components"]["db"]["health"] = {"tcp": {"port": 5432}, "retries": 5}
    data["secrets"]["api_key"] = {}
    new = load_model(data)
    diff = diff_models(old, new)
    assert diff["added"] == ["cache"] and diff["removed"] == ["redis"]
    assert diff["changed"]["db"] == ["exports.DB_PORT", "health.retries"]
    assert diff["changed"]["api"] == ["depends_on.redis", "injected.DB_PORT", "injected.REDIS_HOST",
                                      "injected.REDIS_PORT"]
    assert diff["unchanged"] == ["gateway"]
    assert diff["secrets"] == {"added": ["api_key"], "removed": []}


def test_diff_identical():
    model = load_model(shop())
    diff = diff_models(model, load_model(shop()))
    assert diff["changed"] == {} and diff["unchanged"] == ["api", "db", "gateway", "redis"]
    assert diff["env_defaults"] == {}


# ------------------------------------------------------------------------------------ secret generation

@pytest.mark.parametrize("charset, alphabet", [
    ("alphanumeric", string.ascii_letters + string.digits),
    ("hex", "0123456789abcdef"),
    ("base64url", string.ascii_letters + string.digits + "-_"),
])
def test_generate_secret_length_and_charset(charset, alphabet):
    for length in (8, 33, 256):
        value = generate_secret({"length": length, "charset": charset})
        assert len(value) == length
        assert set(value) <= set(alphabet)


def test_generate_secret_defaults_and_randomness():
    values = {generate_secret({}) for _ in range(200)}
    assert len(values) == 200
    assert all(len(v) == 32 for v in values)
    # every symbol of the alphabet shows up across 200 x 32 draws (expected count per symbol ~103)
    assert set("".join(values)) == set(string.ascii_letters + string.digits)


def test_generate_secret_refuses_bad_spec():
    with pytest.raises(ModelError, match=r"secret.length: expected an integer 8-256, got 4"):
        generate_secret({"length": 4})
    with pytest.raises(ModelError, match=r"secret.charset"):
        generate_secret({"charset": "emoji"})


def test_secret_values_never_enter_the_model():
    model = load_model(shop())
    value = generate_secret(model["secrets"]["db_password"])
    env = effective_env(model, "db", secrets={"db_password": value}, hosts={})
    assert env["POSTGRES_PASSWORD"] == value
    assert value not in json.dumps(model)


# ------------------------------------------------------------------------------------ the documented example

def test_full_example_in_docs_is_valid():
    import pathlib
    import yaml

    doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "app-model.md").read_text()
    section = doc.split("## Full example: a shop", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    model = load_model(yaml.safe_load(block), source="docs/app-model.md")
    assert start_order(model) == [["db", "redis"], ["api"], ["gateway"]]
    env = effective_env(model, "api", secrets={"db_password": "pw"}, hosts={"db": "db", "redis": "redis"})
    assert env == {"DB_HOST": "db", "DB_PORT": "5432", "DB_USER": "shop", "DB_NAME": "shop", "DB_PASSWORD": "pw",
                   "REDIS_HOST": "redis", "REDIS_PORT": "6379", "SHOP_CURRENCY": "EUR", "SHOP_PAGE_SIZE": "20"}
    gateway_env = effective_env(model, "gateway", secrets={}, hosts={"api": "api"})
    assert "proxy_pass http://api:8000/;" in render_config(model, "gateway", 0, env=gateway_env, secrets={})
    assert "proxy_set_header Host $host;" in render_config(model, "gateway", 0, env=gateway_env, secrets={})


# ------------------------------------------------------------------------------------ jobs

def with_migrate(**job: object) -> dict:
    data = shop()
    data["components"]["migrate"] = {"kind": "job", "image": "shop/api:1.0.0", "command": ["migrate"], **job}
    deps = data["components"]["api"].get("depends_on") or {}
    deps = dict.fromkeys(deps) if isinstance(deps, list) else dict(deps)
    data["components"]["api"]["depends_on"] = {**deps, "migrate": None}
    return data


def test_a_job_gates_its_dependents_with_completed():
    """A dependency on a job left without a condition waits for it to complete; services keep started."""
    model = load_model(with_migrate())
    assert model["components"]["migrate"]["kind"] == "job"
    assert model["components"]["api"]["kind"] == "service"
    assert model["components"]["api"]["depends_on"]["migrate"] == {"condition": "completed"}
    assert all(spec["condition"] in ("started", "healthy") for name, spec in
               model["components"]["api"]["depends_on"].items() if name != "migrate")
    listed = with_migrate()
    listed["components"]["api"]["depends_on"] = ["migrate"]
    assert load_model(listed)["components"]["api"]["depends_on"] == {"migrate": {"condition": "completed"}}
    level = {name: i for i, names in enumerate(start_order(model)) for name in names}
    assert level["migrate"] < level["api"]


@pytest.mark.parametrize("field, value, pattern", [
    ("ports", [8000], "a job cannot have ports: a job listens on nothing"),
    ("health", {"exec": ["true"]}, "a job cannot have health"),
    ("exports", {"X": "${host}"}, "a job cannot have exports"),
    ("volumes", [{"name": "mig", "path": "/data"}], "a job cannot have volumes"),
    ("replicas", 2, "a job runs once"),
])
def test_what_a_job_cannot_have(field, value, pattern):
    assert_error(with_migrate(**{field: value}), "components.migrate.%s" % field, pattern)


def test_conditions_must_fit_the_dependency_kind():
    data = with_migrate()
    data["components"]["api"]["depends_on"]["migrate"] = {"condition": "healthy"}
    assert_error(data, "components.api.depends_on.migrate.condition", "migrate is a job: .*condition: completed")
    data = with_migrate()
    data["components"]["api"]["depends_on"] = {"db": {"condition": "completed"}, "migrate": None}
    assert_error(data, "components.api.depends_on.db.condition", "db is a service, which never completes")
    bad = shop()
    bad["components"]["api"]["kind"] = "cronjob"
    assert_error(bad, "components.api.kind", "expected one of service, job, got 'cronjob'")


def test_a_model_stored_before_jobs_existed_diffs_clean():
    """Releases recorded by earlier versions carry no kind: comparing them with today's form finds no change."""
    new = load_model(shop())
    old = copy.deepcopy(new)
    for comp in old["components"].values():
        del comp["kind"]
    assert diff_models(old, new)["changed"] == {}


# ------------------------------------------------------------------------------------ optional modules

def with_modules() -> dict:
    """The shop with two optional modules: reports (on by default) needs search (off by default)."""
    data = shop()
    data["components"]["search"] = {"image": "shop/api:1.0.0", "ports": [9200],
                                    "exports": {"SEARCH_HOST": "${host}"}}
    data["components"]["reports"] = {"image": "shop/api:1.0.0", "depends_on": ["search", "db"]}
    data["modules"] = {"reports": {"components": ["reports"], "default": True, "description": "monthly reports"},
                       "search": {"components": ["search"]}}
    return data


def test_modules_normalise_and_select():
    model = load_model(with_modules())
    assert model["modules"]["search"] == {"description": "", "components": ["search"], "default": False}
    assert load_model(dump_model(model)) == model
    selected, on = select_modules(model, {"search": True})
    assert on == {"reports": True, "search": True} and "reports" in selected["components"]
    selected, on = select_modules(model, {"reports": False})
    assert on == {"reports": False, "search": False}
    assert set(selected["components"]) == set(model["components"]) - {"reports", "search"}
    assert load_model(dump_model(selected)) == selected   # the selection is a model of its own


def test_a_selection_that_breaks_a_dependency_is_refused_naming_both():
    model = load_model(with_modules())
    with pytest.raises(ModelError, match="component reports \\(module reports\\) depends on search of module "
                                         "search, which is off: turn search on too, or turn reports off"):
        select_modules(model, {})          # reports is on by default, search off
    core = with_modules()
    core["components"]["api"]["depends_on"] = ["db", "redis", "search"]
    with pytest.raises(ModelError, match="component api depends on search of module search, which is off: turn "
                                         "search on \\(api is outside every module, so it always runs\\)"):
        select_modules(load_model(core), {"reports": False})
    with pytest.raises(ModelError, match="modules.nope: shop 1.0.0 has no module nope; modules: reports, search"):
        select_modules(model, {"nope": True, "search": True}, asked=["nope"])
    assert select_modules(model, {"nope": True, "search": True})[1] == {"reports": True, "search": True}
    with pytest.raises(ModelError, match="expected true or false, got 'yes'"):
        select_modules(model, {"search": "yes"})


@pytest.mark.parametrize("modules, path, pattern", [
    ({"x": {"components": []}}, "modules.x.components", "required: a list"),
    ({"x": {"components": ["nope"]}}, "modules.x.components[0]", "'nope' is not a component"),
    ({"x": {"components": ["api"]}, "y": {"components": ["api"]}}, "modules.y.components[0]",
     "already in module x"),
    ({"x": {"components": ["api"], "default": "on"}}, "modules.x.default", "expected true or false"),
    ({"Bad_Name": {"components": ["api"]}}, "modules.Bad_Name", "module name"),
    ({"x": {"components": ["api"], "enabled": True}}, "modules.x.enabled", "unknown field"),
])
def test_bad_modules(modules, path, pattern):
    data = shop()
    data["modules"] = modules
    assert_error(data, path, pattern)
