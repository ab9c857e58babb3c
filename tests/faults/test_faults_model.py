"""Item 3 of the fault suite: model attacks, at the model level.

Names, env keys, versions, paths and values that would inject into a compose file, a systemd unit or a
shell are refused by ``app_model.load_model`` naming the field and the fix, and by ``bundle-builder build``
before anything is written. Values that merely look like code (``$(...)``, Jinja, ``%`` specifiers, quotes)
are legal and must stay literal: byte for byte the same in the bundle's model blob and in the site's copy.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from offline_delivery_core.bundle import format as bf
from offline_delivery_core.app.model import ModelError, load_model
from offline_delivery_core.site.repo import SiteRepo, import_bundle
from tests.faults.conftest import Vendor, cli

BASE: dict[str, Any] = {
    "apiVersion": "offline.delivery/v1", "kind": "Application", "name": "tiny", "version": "1.0.0",
    "components": {"app": {"image": "tiny/app:1.0.0", "ports": [{"name": "http", "port": 8000}],
                           "env": {"GREETING": "hello"}, "volumes": [{"name": "data", "path": "/data"}],
                           "config_files": [{"path": "/etc/app.conf", "content": "x\n"}]}},
}


def _app(m: dict[str, Any]) -> dict[str, Any]:
    return m["components"]["app"]


def _rename_component(m: dict[str, Any], name: str) -> None:
    m["components"][name] = m["components"].pop("app")


# label -> (mutation, field path the error must name, words of the fix it must give)
REFUSED: dict[str, tuple[Callable[[dict[str, Any]], None], str, str]] = {
    "component-shell": (lambda m: _rename_component(m, "$(reboot)"), "components.$(reboot)", "lowercase letters"),
    "component-newline": (lambda m: _rename_component(m, "a\nExecStartPre=/bin/sh"), "invalid component name",
                          "lowercase letters"),
    "component-semicolon": (lambda m: _rename_component(m, "a;rm -rf /"), "invalid component name", "lowercase"),
    "component-specifier": (lambda m: _rename_component(m, "web%h"), "components.web%h", "lowercase letters"),
    "component-dotdot": (lambda m: _rename_component(m, ".."), "invalid component name", "lowercase letters"),
    "component-slash": (lambda m: _rename_component(m, "../../etc"), "invalid component name", "lowercase"),
    "app-name-shell": (lambda m: m.update(name="tiny;id"), "name", "lowercase letters"),
    "version-newline": (lambda m: m.update(version="1.0.0\nExecStart=/bin/sh"), "version", "semantic version"),
    "version-path": (lambda m: m.update(version="../../1.0.0"), "version", "semantic version"),
    "env-key-shell": (lambda m: _app(m)["env"].update({"$(id)": "x"}), "components.app.env.$(id)",
                      "[A-Za-z_][A-Za-z0-9_]*"),
    "env-key-newline": (lambda m: _app(m)["env"].update({"A\nB": "x"}), "invalid variable name",
                        "[A-Za-z_][A-Za-z0-9_]*"),
    "env-key-equals": (lambda m: _app(m)["env"].update({"PATH=/tmp:": "x"}), "invalid variable name",
                       "[A-Za-z_][A-Za-z0-9_]*"),
    "env-value-newline": (lambda m: _app(m)["env"].update({"B": "x\nExecStartPre=/bin/sh -c id"}),
                          "components.app.env.B", "use a config file"),
    "env-value-cr": (lambda m: _app(m)["env"].update({"B": "x\rY=1"}), "components.app.env.B", "remove it"),
    "env-value-nul": (lambda m: _app(m)["env"].update({"B": "x\0y"}), "components.app.env.B", "remove it"),
    "env-value-unknown-ref": (lambda m: _app(m)["env"].update({"B": "${HOME}"}), "components.app.env.B",
                              "$${"),
    "volume-dotdot": (lambda m: _app(m)["volumes"][0].update(path="/data/../../etc"),
                      "components.app.volumes[0].path", "normalised path"),
    "volume-relative": (lambda m: _app(m)["volumes"][0].update(path="data"), "components.app.volumes[0].path",
                        "start with '/'"),
    "volume-newline": (lambda m: _app(m)["volumes"][0].update(path="/data\n/etc"),
                       "components.app.volumes[0].path", "newline"),
    "volume-root": (lambda m: _app(m)["volumes"][0].update(path="/"), "components.app.volumes[0].path",
                    "name a file or directory"),
    "volume-name-path": (lambda m: _app(m)["volumes"][0].update(name="../x"), "components.app.volumes[0].name",
                         "lowercase letters"),
    "config-dotdot": (lambda m: _app(m)["config_files"][0].update(path="/etc/../root/.ssh/authorized_keys"),
                      "components.app.config_files[0].path", "normalised path"),
    "config-relative": (lambda m: _app(m)["config_files"][0].update(path="etc/app.conf"),
                        "components.app.config_files[0].path", "start with '/'"),
    "config-newline": (lambda m: _app(m)["config_files"][0].update(path="/etc/app.conf\n"),
                       "components.app.config_files[0].path", "newline"),
    "config-setuid-mode": (lambda m: _app(m)["config_files"][0].update(mode="4755"),
                           "components.app.config_files[0].mode", "'0644'"),
    "user-shell": (lambda m: _app(m).update(user="root;id"), "components.app.user", "'uid:gid'"),
    "image-shell": (lambda m: _app(m).update(image="tiny/app:1.0.0;id"), "components.app.image",
                    "[registry[:port]/]path"),
    "group-shell": (lambda m: _app(m).update(placement={"group": "web;id"}), "components.app.placement.group",
                    "[A-Za-z_][A-Za-z0-9_]*"),
    "port-name-shell": (lambda m: _app(m)["ports"][0].update(name="h;x"), "components.app.ports[0].name",
                        "lowercase letters"),
}

# Legal values that look like code: they must reach the site exactly as written. The renderers (compose,
# systemd; see the section at the end) must then escape them for their formats.
LITERAL_ENV = {
    "SHELL_SUBST": "$(reboot); `id` && rm -rf / || true",
    "JINJA": "{{ lookup('pipe', 'id') }} {% for x in y %}{{ x }}{% endfor %} {# c #}",
    "SPECIFIERS": "%h %n %i %% %u",
    "ESCAPED_REF": "$${secrets.not_a_ref} $${HOME}",
    "QUOTES": "a\"b'c\\d $$ ; # not a comment",
}
LITERAL_CONFIG = "{% raw %}{{ 7*7 }}{% endraw %}\n$(id)\n%h\n$${env.NOT_EXPANDED}\nExecStart=/bin/sh\n"


def hostile(label: str) -> dict[str, Any]:
    model = copy.deepcopy(BASE)
    REFUSED[label][0](model)
    return model


@pytest.mark.parametrize("label", sorted(REFUSED))
def test_injection_is_refused_by_the_model_naming_the_field(label: str) -> None:
    dummy, field, fix = REFUSED[label]
    with pytest.raises(ModelError) as err:
        load_model(hostile(label), source="app.yml")
    text = str(err.value)
    assert text.startswith("app.yml") and field in text and fix in text, text


@pytest.mark.parametrize("label", ["component-newline", "env-key-shell", "env-value-newline", "volume-dotdot",
                                   "config-relative", "version-newline"])
def test_bundle_builder_refuses_the_model_before_writing_anything(vendor: Vendor, tmp_path: Path,
                                                                   label: str) -> None:
    model = tmp_path / "app.yml"
    model.write_text(yaml.safe_dump(hostile(label), sort_keys=False))
    out = tmp_path / "out"
    out.mkdir()
    proc = cli("build", str(model), "-o", str(out), "--images-from", f"oci:{vendor.root / 'oci'}",
               "--sign-key", str(vendor.key), check=False)
    assert proc.returncode != 0
    assert str(model) in proc.stderr and REFUSED[label][1] in proc.stderr, proc.stderr
    assert not any(out.iterdir()), "a refused model must leave the output directory empty"


def test_code_looking_values_stay_literal_from_app_yml_to_the_site(vendor: Vendor, tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE)
    _app(doc)["env"].update(LITERAL_ENV)
    _app(doc)["config_files"][0]["content"] = LITERAL_CONFIG
    _app(doc)["command"] = ["sh", "-c", "echo $(id) {{ x }} %h"]
    model = tmp_path / "app.yml"
    model.write_text(yaml.safe_dump(doc, sort_keys=False))
    normal = load_model(yaml.safe_load(model.read_text()))
    assert {k: normal["components"]["app"]["env"][k] for k in LITERAL_ENV} == LITERAL_ENV
    proc = cli("build", str(model), "-o", str(tmp_path / "out"), "--images-from", f"oci:{vendor.root / 'oci'}",
               "--sign-key", str(vendor.key), "--json")
    bundle = Path(json.loads(proc.stdout)["path"])
    head = bf.read_head(str(bundle), vendor.keys)
    carried = json.loads(bf.read_blob(str(bundle), head.manifest["model"]["digest"]))
    app = carried["components"]["app"]
    assert {k: app["env"][k] for k in LITERAL_ENV} == LITERAL_ENV
    assert app["config_files"][0]["content"] == LITERAL_CONFIG
    assert app["command"] == ["sh", "-c", "echo $(id) {{ x }} %h"]
    repo = SiteRepo(str(tmp_path / "site"))
    import_bundle(repo, str(bundle), vendor.keys)
    stored = Path(repo.blob_file(head.manifest["model"]["digest"])).read_bytes()
    assert json.loads(stored) == carried, "the site's copy of the model is the vendor's, byte for byte"


# --------------------------------------------------------------------------------------------------------
# Rendered-output checks
#
# Values the model accepts reach the runtimes' files literally: the compose file (JSON, read back with PyYAML
# and compose's interpolation undone: '$$' -> '$'), the systemd unit (ExecStart= split and unquoted per
# systemd.syntax: '%%' specifiers first, then C-style quoting, then '$$' -> '$'), and the systemd
# EnvironmentFile (systemd's env-file quoting), the Compose env file (the .env syntax of
# docs.docker.com/compose/env-file/: unquoted values are interpolated and lose a ' #' comment, single-quoted
# ones are literal). A value Compose cannot carry (a single quote, a trailing backslash) is refused by name.
# Paths and argv text that no format can carry are refused by the model (the last cases).

import os  # noqa: E402
import re  # noqa: E402

from offline_delivery_core.targets.compose import ComposeRuntime, env_file_text  # noqa: E402
from offline_delivery_core.app.runtime import ComponentSpec, DeployError  # noqa: E402
from offline_delivery_core.targets.systemd import render_env_file, render_unit  # noqa: E402

# Every kind of character the model lets through in env values and argv items.
LITERAL_ARGV = ["/bin/sh", "-c", "echo $(id) ${HOME} $HOME $$ {{ x }} %h %% \"q\" 'q' \\ ; # not a comment",
                "with space", "tab\tinside", "", "ünï©ødé", "%n%i%u", "$${literal}"]
LITERAL_VALUES = {**LITERAL_ENV, "PERCENT": "100%", "BRACED": "${NOT_EXPANDED}", "SPACES": "  padded  ",
                  "BACKTICK": "`uname`", "HASH": "#start", "EMPTY": "", "UNICODE": "ünï©ødé €"}


def _spec(env: dict[str, str], argv: list[str]) -> ComponentSpec:
    return ComponentSpec(
        name="app", app="tiny", version="1.0.0", image="10.0.0.2:5000/tiny/app@sha256:" + "cd" * 32,
        reference="tiny/app:1.0.0", index_digest="sha256:" + "cd" * 32, manifest_digest="sha256:" + "ab" * 32,
        platform="linux/amd64", entrypoint=argv[:1], command=argv[1:], user=None, env=env,
        config_files=[{"path": "/etc/app.conf", "content": LITERAL_CONFIG, "mode": "0644"}],
        volumes=[{"name": "data", "path": "/var/lib/app@1/data+x"}], ports=[], health=None, depends_on={},
        local_deps=[], replicas=1, resources={}, fingerprint="sha256:" + "ef" * 32)


def _compose_unescape(text: str, where: str) -> str:
    """Undo compose's interpolation escaping; any '$' that compose would interpolate is a failure."""
    assert not re.search(r"(?<!\$)(\$\$)*\$(?!\$)", text.replace("$$", "")), f"{where}: unescaped '$' in {text!r}"
    return text.replace("$$", "$")


def compose_project(tmp_path: Path, spec: ComponentSpec) -> tuple[ComposeRuntime, dict[str, Any]]:
    """The compose runtime's project files for ``spec`` (no docker needed), and compose.yaml read back."""
    runtime = ComposeRuntime("tiny", apps_dir=str(tmp_path / "apps"), state_dir=str(tmp_path / "state"),
                             run=lambda argv: (1, "", "no docker here"))
    runtime._write_project([spec])
    return runtime, yaml.safe_load(Path(runtime.compose_file).read_text())


COMPOSE_VALUES = {k: v for k, v in LITERAL_VALUES.items() if "'" not in v and not v.endswith("\\")}


def test_compose_file_carries_paths_literally_and_no_env_value(tmp_path: Path) -> None:
    runtime, doc = compose_project(tmp_path, _spec(dict(COMPOSE_VALUES), ["/bin/app", "--serve"]))
    service = doc["services"]["app"]
    assert service["entrypoint"] + service["command"] == ["/bin/app", "--serve"]
    assert [m["target"] for m in service["volumes"]] == ["/var/lib/app@1/data+x", "/etc/app.conf"]
    config = Path(service["volumes"][1]["source"])
    assert config.read_text() == LITERAL_CONFIG, "the config file is written as rendered, byte for byte"
    text = Path(runtime.compose_file).read_text()
    assert all(v not in text for v in COMPOSE_VALUES.values() if len(v) > 3), "env values stay out of compose.yaml"
    assert "$" not in text and "%" not in text


def _systemd_words(line: str) -> list[str]:
    """An ExecStart= value as systemd reads it: specifiers, then words with C-style unquoting, then '$$'."""
    assert not re.search(r"%[^%]", line.replace("%%", "")), f"unescaped specifier in {line!r}"
    line = line.replace("%%", "%")
    words, pos = [], 0
    while pos < len(line):
        if line[pos] == " ":
            pos += 1
            continue
        assert line[pos] == '"', f"every argument is quoted: {line[pos:]!r}"
        pos += 1
        out = []
        while line[pos] != '"':
            if line[pos] == "\\":
                nxt = line[pos + 1]
                if nxt == "x":
                    out.append(chr(int(line[pos + 2:pos + 4], 16)))
                    pos += 4
                    continue
                out.append({"n": "\n", "t": "\t", "\\": "\\", '"': '"'}[nxt])
                pos += 2
                continue
            out.append(line[pos])
            pos += 1
        pos += 1
        word = "".join(out)
        assert not re.search(r"\$", word.replace("$$", "")), f"unescaped '$' in {word!r}"
        words.append(word.replace("$$", "$"))
    return words


def _systemd_env(text: str) -> dict[str, str]:
    """An EnvironmentFile as systemd reads it (systemd.exec: shell-like quoting, no expansion)."""
    env = {}
    for line in text.splitlines():
        key, _sep, raw = line.partition("=")
        if raw.startswith("'"):
            assert raw.endswith("'") and "'" not in raw[1:-1], line
            env[key] = raw[1:-1]
        else:
            assert raw.startswith('"') and raw.endswith('"'), f"an unquoted value would lose spaces: {line!r}"
            body, out, pos = raw[1:-1], [], 0
            while pos < len(body):
                if body[pos] == "\\" and body[pos + 1] in '"\\`$':
                    out.append(body[pos + 1])
                    pos += 2
                    continue
                assert body[pos] != '"', f"unescaped quote in {line!r}"
                out.append(body[pos])
                pos += 1
            env[key] = "".join(out)
    return env


def test_systemd_unit_and_env_file_carry_the_values_literally(tmp_path: Path) -> None:
    spec = _spec(dict(LITERAL_VALUES), LITERAL_ARGV)
    unit = render_unit(spec, {}, root=str(tmp_path / "root"), view=str(tmp_path / "rootfs"), app="tiny", env_file="/var/lib/offline-delivery/apps/tiny/env/app.env",
                       configs=[("/srv/x/config/app/0-app.conf", "/etc/app.conf")],
                       volumes=[("/srv/x/volumes/data", "/var/lib/app@1/data+x")])
    exec_lines = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert len(exec_lines) == 1
    assert _systemd_words(exec_lines[0][len("ExecStart="):]) == LITERAL_ARGV
    assert "BindPaths=/srv/x/volumes/data:/var/lib/app@1/data+x" in unit.splitlines()
    assert all(v not in unit for v in LITERAL_VALUES.values() if len(v) > 3), "env values stay out of the unit"
    assert _systemd_env(render_env_file(spec.env)) == LITERAL_VALUES


SEPARATOR_REFUSED: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "volume-colon": (lambda m: _app(m)["volumes"][0].update(path="/data:/host:rw"), "components.app.volumes[0].path"),
    "volume-space": (lambda m: _app(m)["volumes"][0].update(path="/data /etc"), "components.app.volumes[0].path"),
    "volume-cr": (lambda m: _app(m)["volumes"][0].update(path="/data\rx"), "components.app.volumes[0].path"),
    "volume-specifier": (lambda m: _app(m)["volumes"][0].update(path="/data/%h"), "components.app.volumes[0].path"),
    "volume-dollar": (lambda m: _app(m)["volumes"][0].update(path="/data/$(id)"), "components.app.volumes[0].path"),
    "config-colon": (lambda m: _app(m)["config_files"][0].update(path="/etc/x:/etc/shadow"),
                     "components.app.config_files[0].path"),
    "config-tab": (lambda m: _app(m)["config_files"][0].update(path="/etc/x\ty"),
                   "components.app.config_files[0].path"),
    "command-newline": (lambda m: _app(m).update(command=["sh", "-c", "true\nExecStartPre=/bin/sh"]),
                        "components.app.command[2]"),
    "entrypoint-cr": (lambda m: _app(m).update(entrypoint=["/bin/sh\r"]), "components.app.entrypoint[0]"),
    "health-exec-newline": (lambda m: _app(m).update(health={"exec": ["sh", "-c", "a\nb"]}),
                            "components.app.health.exec[2]"),
    "description-newline": (lambda m: m.update(description="shop\nExecStart=/bin/sh"), "description"),
    "component-description-escape": (lambda m: _app(m).update(description="web\x1b[2J"),
                                      "components.app.description"),
}


@pytest.mark.parametrize("label", sorted(SEPARATOR_REFUSED))
def test_separator_and_control_characters_are_refused_naming_the_field(label: str) -> None:
    model = copy.deepcopy(BASE)
    SEPARATOR_REFUSED[label][0](model)
    with pytest.raises(ModelError) as err:
        load_model(model, source="app.yml")
    text = str(err.value)
    assert SEPARATOR_REFUSED[label][1] in text, text
    assert "[A-Za-z0-9._@+-]" in text or "control character" in text or "newline" in text, text


def test_paths_with_every_allowed_character_are_accepted() -> None:
    model = copy.deepcopy(BASE)
    _app(model)["volumes"][0]["path"] = "/var/lib/a.b_c-d@e+f/G9"
    _app(model)["config_files"][0]["path"] = "/etc/app@1/x+y.conf"
    loaded = load_model(model)
    assert loaded["components"]["app"]["volumes"][0]["path"] == "/var/lib/a.b_c-d@e+f/G9"


def test_compose_file_carries_argv_literally(tmp_path: Path) -> None:
    dummy, doc = compose_project(tmp_path, _spec({}, LITERAL_ARGV))
    service = doc["services"]["app"]
    argv = [_compose_unescape(a, "entrypoint/command") for a in service["entrypoint"] + service["command"]]
    assert argv == LITERAL_ARGV


def compose_env_file(text: str) -> dict[str, str]:
    """An env_file as Compose reads it (docs.docker.com/compose/env-file/), without an environment:
    returns the values, or fails on any value Compose would interpolate."""
    env = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _sep, raw = line.partition("=")
        if raw[:1] == "'":  # literal up to the closing quote (Compose has no escape inside single quotes)
            end = raw.find("'", 1)
            out = [raw[1:end]] if end > 0 else []
            end = end if end > 0 else None
            rest = raw[end + 1:].strip() if end is not None else "?"
            assert rest == "" or rest.startswith("#"), f"{key}: text after the closing quote: {line!r}"
            env[key] = "".join(out)
            continue
        assert raw[:1] != '"', f"{key}: a value starting with a double quote is read as a quoted value"
        value = re.split(r"\s#", raw, maxsplit=1)[0].strip()
        assert "$" not in value, f"{key}: Compose interpolates '$' in an unquoted value: {raw!r}"
        env[key] = value
    return env


def test_compose_env_file_carries_the_values_literally(tmp_path: Path) -> None:
    assert compose_env_file(env_file_text(dict(COMPOSE_VALUES), "app")) == COMPOSE_VALUES
    # the check covers what Compose would otherwise change: '$', ' #', edge spaces, a leading '#'
    assert {"SHELL_SUBST", "ESCAPED_REF", "BRACED", "SPACES", "HASH", "SPECIFIERS"} <= set(COMPOSE_VALUES)


@pytest.mark.parametrize("value", ["it's", "ends\\", "'quoted'"])
def test_a_value_compose_cannot_carry_is_refused_by_name(value: str) -> None:
    with pytest.raises(DeployError) as err:
        env_file_text({"GOOD": "x", "BAD": value}, "app")
    assert "component app" in str(err.value) and "BAD" in str(err.value) and "GOOD" not in str(err.value)
