"""Nothing derived from a secret leaves the host it lives on (issue 16, item 5).

A component's fingerprint covers its resolved env (secrets, site overrides) and is written where more people can
read it than can read the env: the compose file's labels, the 0644 unit file, the k8s annotations, the module's
result. It is an HMAC under the deploying host's own key (``<state_dir>/fingerprint.key``), so it still tells
"same spec" from "changed" there, but a plain digest of the spec (the scheme before) appears nowhere, and a weak
override value cannot be found by hashing guesses. Status reports name the overridden variables, never their
values. The modules take ``overrides`` as a ``no_log`` argument (run through ansible: tests/faults/
test_faults_secrets.py).
"""

from __future__ import annotations

import ast
import hashlib
import hmac
import json
import os
import stat
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from offline_delivery_core.app import state as app_state
from offline_delivery_core.targets.compose import ComposeRuntime
from offline_delivery_core.app.engine import Engine, Target, host_status
from offline_delivery_core.targets.k8s import (FINGERPRINT_ANNOTATION, K8sRuntime, RenderOptions, model_input, redact,
                                           render_component, render_manifests)
from offline_delivery_core.app.runtime import ComponentSpec, Observed, desired_specs
from offline_delivery_core.app.state import AppState, StateError
from offline_delivery_core.targets.systemd import render_unit
from offline_delivery_core.site.status import app_report
from tests.unit.test_app_engine import HOST, PLATFORM, SECRETS, FakeRuntime, images, model

ROOT = Path(__file__).resolve().parents[2]
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
WEAK = "hunter2"                        # a site override that is a (weak) credential
DISTINCT = "XTS-override-7f3c-hunter2"  # an override value to look for in the status
WORDLIST = ["123456", "password", "admin", "letmein", "qwerty", "secret", "changeme", "hunter1", WEAK, "hunter3"]


def canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def plain_digests(spec: ComponentSpec) -> list[str]:
    """What an unkeyed fingerprint of ``spec`` would be (the scheme before: sha256 of the spec without version and
    fingerprint), and sha256 of its resolved env alone: none of them may appear where a fingerprint goes."""
    data = asdict(spec)
    data.pop("version")
    data.pop("fingerprint")
    return [hashlib.sha256(canonical(data)).hexdigest(), hashlib.sha256(canonical(spec.env)).hexdigest()]


def specs(overrides: dict | None = None, key: bytes = KEY, secrets: dict | None = None, version: str = "1.0.0",
          local_address: Any = "127.0.0.1") -> dict[str, ComponentSpec]:
    m = model(version)
    out = desired_specs(m, images(m), host=HOST, platform=PLATFORM, placement={n: [HOST] for n in m["components"]},
                        addresses={}, secrets=SECRETS if secrets is None else secrets, overrides=overrides or {},
                        registry="repo:5000", fingerprint_key=key, local_address=local_address)
    return {s.name: s for s in out}


def engine(state_dir: Path, rt: FakeRuntime, check: bool = False) -> Engine:
    target = Target(host=HOST, platform=PLATFORM, registry="repo:5000", secrets=SECRETS,
                    placement={n: [HOST] for n in model("1.0.0")["components"]}, addresses={})
    return Engine(rt, AppState(str(state_dir), "shop"), target, health_cap=1, actor="t", check_mode=check)


def deploy(state_dir: Path, rt: FakeRuntime, overrides: dict, check: bool = False) -> dict:
    m = model("1.0.0")
    return engine(state_dir, rt, check).deploy(version="1.0.0", model=m, images=images(m), overrides=overrides,
                                               snapshot=False, auto_rollback=True)


# -- the fingerprint ------------------------------------------------------------------------------------


def test_same_spec_and_key_give_the_same_fingerprint_another_key_another() -> None:
    first, again, other = specs(), specs(), specs(key=OTHER_KEY)
    for name, spec in first.items():
        assert spec.fingerprint.startswith("hmac-sha256:") and len(spec.fingerprint) == len("hmac-sha256:") + 64
        assert again[name].fingerprint == spec.fingerprint, "change detection needs a stable fingerprint"
        assert other[name].fingerprint != spec.fingerprint, "another host's key gives other fingerprints"
    # Still exactly as sensitive as before: a changed override or secret changes only what it reaches.
    changed = specs({"api": {"SHOP_CURRENCY": "CHF"}})
    assert {n for n in first if first[n].fingerprint != changed[n].fingerprint} == {"api"}
    rotated = specs(secrets=dict(SECRETS, redis_password="x" * 32))
    assert {n for n in first if first[n].fingerprint != rotated[n].fingerprint} == {"redis", "api"}


def test_the_fingerprint_is_the_hmac_of_the_spec_under_the_key() -> None:
    spec = specs()["api"]
    data = asdict(spec)
    data.pop("version")
    data.pop("fingerprint")
    data.pop("kind")   # a service's kind is left out: fingerprints from before jobs existed stay
    assert spec.fingerprint == "hmac-sha256:" + hmac.new(KEY, canonical(data), hashlib.sha256).hexdigest()


def test_a_short_or_missing_key_is_refused() -> None:
    for key in (b"", b"k" * 16, None):
        with pytest.raises((ValueError, TypeError)):
            specs(key=key)  # type: ignore[arg-type]


# -- the key --------------------------------------------------------------------------------------------


def test_the_key_is_made_once_0600_and_reused(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    key = app_state.fingerprint_key(str(state_dir))
    path = state_dir / "fingerprint.key"
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert bytes.fromhex(path.read_text().strip()) == key
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    before = path.stat()
    assert app_state.fingerprint_key(str(state_dir)) == key, "read, not made again"
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(os.listdir(state_dir)) == ["fingerprint.key"], "no temporary file left"
    assert app_state.fingerprint_key(str(tmp_path / "other")) != key, "random per state directory"


def test_a_key_made_by_another_deploy_is_used_not_replaced(tmp_path: Path) -> None:
    theirs = os.urandom(32)
    (tmp_path / "fingerprint.key").write_text(theirs.hex() + "\n")
    os.chmod(tmp_path / "fingerprint.key", 0o640)
    assert app_state.fingerprint_key(str(tmp_path)) == theirs
    assert stat.S_IMODE((tmp_path / "fingerprint.key").stat().st_mode) == 0o600, "tightened"


def test_check_mode_makes_no_key(tmp_path: Path) -> None:
    one = app_state.fingerprint_key(str(tmp_path / "state"), create=False)
    two = app_state.fingerprint_key(str(tmp_path / "state"), create=False)
    assert len(one) == 32 and one != two and not (tmp_path / "state").exists()


def test_a_damaged_key_file_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "fingerprint.key").write_text("not a key\n")
    with pytest.raises(StateError, match="fingerprint.key is not a fingerprint key.*move it away"):
        app_state.fingerprint_key(str(tmp_path))


def test_the_engine_keys_with_its_state_dir_and_plans_as_before(tmp_path: Path) -> None:
    rt = FakeRuntime()
    first = deploy(tmp_path, rt, {})
    key = bytes.fromhex((tmp_path / "fingerprint.key").read_text())
    assert stat.S_IMODE((tmp_path / "fingerprint.key").stat().st_mode) == 0o600
    assert {n: c["fingerprint"] for n, c in first["components"].items()} == {
        n: s.fingerprint for n, s in specs(key=key).items()}
    again = deploy(tmp_path, rt, {})
    assert not again["changed"] and again["plan"]["unchanged"] == ["db", "redis", "api", "gateway"]
    # What a host deployed before the change runs carries sha256: fingerprints: every component restarts once.
    rt.running = {n: Observed("sha256:" + plain_digests(specs()[n])[0], True, o.started_at)
                  for n, o in rt.running.items()}
    assert deploy(tmp_path, rt, {})["plan"]["changed"] == ["db", "redis", "api", "gateway"]
    assert not deploy(tmp_path, rt, {})["changed"]


def test_check_mode_on_a_fresh_host_writes_no_key(tmp_path: Path) -> None:
    result = deploy(tmp_path / "state", FakeRuntime(), {}, check=True)
    assert result["plan"]["added"] == ["db", "redis", "api", "gateway"]
    assert not (tmp_path / "state" / "fingerprint.key").exists()


# -- what leaves the host carries no plain digest ---------------------------------------------------------


def compose_text(tmp_path: Path, all_specs: list[ComponentSpec]) -> str:
    runtime = ComposeRuntime("shop", apps_dir=str(tmp_path / "apps"), state_dir=str(tmp_path / "state"),
                             run=lambda argv: (1, "", "no docker here"))
    runtime._write_project(all_specs)
    return Path(runtime.compose_file).read_text()


def unit_text(tmp_path: Path, spec: ComponentSpec) -> str:
    return render_unit(spec, {"Entrypoint": ["/bin/app"]}, root=str(tmp_path / "root"),
                       view=str(tmp_path / "rootfs"), app="shop", env_file="/var/lib/offline-delivery/apps/shop/env/x.env",
                       configs=[], volumes=[])


def k8s_text(spec: ComponentSpec) -> str:
    options = RenderOptions(namespace="shop", registry="repo:5000")
    runtime = K8sRuntime("shop", client=None, options=options, secret_values=SECRETS.values())  # type: ignore[arg-type]
    return json.dumps(redact(runtime.objects_for(spec)))


@pytest.mark.parametrize("where", ["compose file", "unit file", "k8s objects", "module result"])
def test_no_plain_digest_of_the_spec_is_written_where_others_read(tmp_path: Path, where: str) -> None:
    overrides = {"gateway": {"ADMIN_PASSWORD": WEAK}, "api": {"DB_PASSWORD_COPY": SECRETS["db_password"]}}
    by_name = specs(overrides)
    if where == "compose file":
        text = compose_text(tmp_path, list(by_name.values()))
        texts = {n: text for n in by_name}
    elif where == "unit file":
        texts = {n: unit_text(tmp_path, s) for n, s in by_name.items()}
    elif where == "k8s objects":
        by_name = specs(overrides, local_address=lambda c: c)  # ${host} = Service names, as K8sRuntime says
        texts = {n: k8s_text(s) for n, s in by_name.items()}
    else:
        result = deploy(tmp_path, FakeRuntime(), overrides)
        text = json.dumps(result)
        texts = {n: text for n in by_name}
        # The plain digests do not depend on the key; the fingerprint is the one the engine made.
        by_name = {n: replace(s, fingerprint=result["components"][n]["fingerprint"]) for n, s in by_name.items()}
    for name, spec in by_name.items():
        assert spec.fingerprint in texts[name], f"{where} of {name} carries the fingerprint"
        for digest in plain_digests(spec):
            assert digest not in texts[name], f"{where} of {name} carries a plain sha256 of its resolved spec"
        assert SECRETS["db_password"] not in texts[name]
        if where != "k8s objects":  # k8s: an override that holds no generated secret is inline env, by design
            assert WEAK not in texts[name]


def test_render_manifests_annotations_carry_no_plain_digest_of_the_objects() -> None:
    m = model("1.0.0")
    overrides = {"gateway": {"ADMIN_PASSWORD": WEAK}}
    objects = render_manifests(m, namespace="shop", secrets=SECRETS, overrides=overrides, registry="repo:5000",
                               image_digests={c: images(m)[c]["index"] for c in m["components"]},
                               fingerprint_key=KEY)
    text = json.dumps(objects)
    opts = RenderOptions(namespace="shop", registry="repo:5000")
    for name in m["components"]:
        inp = model_input(m, name, secrets=SECRETS, overrides=overrides.get(name) or {},
                          image=next(c["image"] for o in objects if o["kind"] in ("Deployment", "StatefulSet")
                                     and o["metadata"]["labels"]["app.kubernetes.io/component"] == name
                                     for c in o["spec"]["template"]["spec"]["containers"]))
        unstamped = render_component(inp, opts)
        plain = hashlib.sha256(canonical(unstamped)).hexdigest()
        keyed = "hmac-sha256:" + hmac.new(KEY, canonical(unstamped), hashlib.sha256).hexdigest()
        assert plain not in text, f"the objects of {name} carry the plain sha256 of its objects (Secret data)"
        workload = next(o for o in objects if o["kind"] in ("Deployment", "StatefulSet")
                        and o["metadata"]["labels"]["app.kubernetes.io/component"] == name)
        assert workload["metadata"]["annotations"][FINGERPRINT_ANNOTATION] == keyed


def test_a_weak_override_password_cannot_be_found_by_hashing_guesses(tmp_path: Path) -> None:
    """Someone who may read a unit file, a container's labels or a workload's annotations knows everything of
    the gateway's spec but the override (the model and the site's layout are no secret; the gateway has no
    generated secret). Hashing each candidate value the way an unkeyed fingerprint is made finds nothing; only
    with the host's key (which never leaves it) would the search succeed."""
    published = specs({"gateway": {"ADMIN_PASSWORD": WEAK}})["gateway"].fingerprint
    published_hex = published.split(":", 1)[1]
    found = []
    for guess in WORDLIST:
        spec = specs({"gateway": {"ADMIN_PASSWORD": guess}}, key=OTHER_KEY)["gateway"]
        data = asdict(spec)
        data.pop("version")
        data.pop("fingerprint")
        tries = {hashlib.sha256(canonical(data)).hexdigest(), hashlib.sha256(canonical(spec.env)).hexdigest(),
                 hmac.new(b"", canonical(data), hashlib.sha256).hexdigest(), spec.fingerprint.split(":", 1)[1]}
        if published_hex in tries:
            found.append(guess)
    assert found == [], "a weak override value was found by hashing guesses: %s" % found
    # Not vacuous: with the host's key the same search finds it at once.
    assert [g for g in WORDLIST if specs({"gateway": {"ADMIN_PASSWORD": g}})["gateway"].fingerprint == published] \
        == [WEAK]


def test_k8s_annotations_do_not_give_away_a_weak_override() -> None:
    m = model("1.0.0")
    digests = {c: images(m)[c]["index"] for c in m["components"]}

    def annotation(value: str, key: bytes) -> str:
        objects = render_manifests(m, namespace="shop", secrets=SECRETS, registry="repo:5000", image_digests=digests,
                                   overrides={"gateway": {"ADMIN_PASSWORD": value}}, fingerprint_key=key)
        return next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "gateway"
                    )["metadata"]["annotations"][FINGERPRINT_ANNOTATION]

    published = annotation(WEAK, KEY).split(":", 1)[1]
    opts = RenderOptions(namespace="shop", registry="repo:5000")
    image = "repo:5000/shop/gateway:1.0.0@" + digests["gateway"]
    for guess in WORDLIST:
        unstamped = render_component(model_input(m, "gateway", secrets=SECRETS,
                                                 overrides={"ADMIN_PASSWORD": guess}, image=image), opts)
        assert hashlib.sha256(canonical(unstamped)).hexdigest() != published, f"{guess!r} found by hashing"
        assert annotation(guess, OTHER_KEY).split(":", 1)[1] != published


# -- status reports carry no override values --------------------------------------------------------------


def test_the_status_names_overridden_variables_never_their_values(tmp_path: Path) -> None:
    rt = FakeRuntime()
    deploy(tmp_path, rt, {"api": {"SHOP_CURRENCY": DISTINCT}, "gateway": {"ADMIN_PASSWORD": WEAK}})
    assert DISTINCT in (tmp_path / "apps" / "shop" / "state.json").read_text(), "kept on the host (0600 state)"
    status = host_status(rt, AppState(str(tmp_path), "shop"))
    text = json.dumps(status)
    assert DISTINCT not in text and WEAK not in text, "an override value is in the status"
    assert status["overridden"] == {"api": ["SHOP_CURRENCY"], "gateway": ["ADMIN_PASSWORD"]}
    assert "overrides" not in status
    report = json.dumps(app_report(status))
    assert DISTINCT not in report and "SHOP_CURRENCY" not in report, "the site report travels without them"


# -- the modules' arguments -------------------------------------------------------------------------------


def argument_spec(module: str) -> dict[str, dict[str, Any]]:
    """The literal argument_spec of a module's AnsibleModule(...) call (``**SHARED`` entries left out)."""
    tree = ast.parse((ROOT / "plugins" / "modules" / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "AnsibleModule":
            spec = next(k.value for k in node.keywords if k.arg == "argument_spec")
            assert isinstance(spec, ast.Dict)
            return {ast.literal_eval(k): ast.literal_eval(v) for k, v in zip(spec.keys, spec.values) if k is not None}
    raise AssertionError(f"no AnsibleModule call in {module}")


@pytest.mark.parametrize("module", ["app_deploy", "app_k8s_manifests"])
def test_overrides_and_secrets_are_no_log_arguments(module: str) -> None:
    spec = argument_spec(module)
    assert spec["overrides"].get("no_log") is True, f"{module}: overrides is not no_log"
    assert spec["secrets"].get("no_log") is True
