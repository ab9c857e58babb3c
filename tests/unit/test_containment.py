"""Each target contains what it runs, the same way (issue 16, item 3): the model's capabilities only (a default
set plus what a component adds in ``security.capabilities``), no new privileges unless the component allows
escalation; on systemd also private devices, protected kernel, cgroups, clock and hostname, /usr and /etc
read-only, setuid/setgid refused, the service system-call set. Before, a systemd unit ran with every capability
and the host's devices (systemd-analyze security 9.4 UNSAFE), and compose services and pods got no hardening."""
from __future__ import annotations

import copy
import json

import pytest
import yaml

from offline_delivery_core.app.model import DEFAULT_CAPABILITIES, ModelError, load_model
from offline_delivery_core.targets.systemd import hardening_lines
from tests.unit.test_app_engine import model
from tests.unit.test_fingerprint_secrets import compose_text, k8s_text, specs, unit_text

DEFAULT_CAPS = sorted(DEFAULT_CAPABILITIES)


def with_security(security: dict) -> dict:
    m = copy.deepcopy(model("1.0.0"))
    m["components"]["api"]["security"] = security
    return load_model(m)


def test_the_model_normalises_security() -> None:
    comp = with_security({"capabilities": ["cap_net_admin", "NET_ADMIN", "CHOWN"], "privilege_escalation": True})
    assert comp["components"]["api"]["security"] == {"capabilities": ["NET_ADMIN"], "privilege_escalation": True}
    assert load_model(model("1.0.0"))["components"]["db"]["security"] == {"capabilities": [],
                                                                           "privilege_escalation": False}


@pytest.mark.parametrize("security, message", [
    ({"capabilities": ["ROOT_ALL"]}, "components.api.security.capabilities[0]: unknown capability 'ROOT_ALL'"),
    ({"capabilities": "NET_ADMIN"}, "components.api.security.capabilities: expected a list"),
    ({"privilege_escalation": "yes"}, "components.api.security.privilege_escalation: expected true or false"),
    ({"privileged": True}, "privileged"),
])
def test_a_bad_security_field_is_named(security: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message.replace("[", r"\[").replace("]", r"\]")):
        with_security(security)


def test_compose_drops_every_capability_but_the_model_s_and_sets_no_new_privileges(tmp_path) -> None:  # type: ignore[no-untyped-def]
    doc = yaml.safe_load(compose_text(tmp_path, list(specs().values())))
    for name, service in doc["services"].items():
        assert service["cap_drop"] == ["ALL"] and service["cap_add"] == DEFAULT_CAPS, name
        assert service["security_opt"] == ["no-new-privileges:true"], name


def test_a_component_that_allows_escalation_and_adds_a_capability_gets_exactly_that(tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = specs()["api"]
    from dataclasses import replace
    relaxed = replace(spec, security={"capabilities": ["NET_ADMIN"], "privilege_escalation": True})
    service = yaml.safe_load(compose_text(tmp_path, [relaxed]))["services"]["api"]
    assert "NET_ADMIN" in service["cap_add"] and "security_opt" not in service
    unit = unit_text(tmp_path, relaxed)
    assert "CAP_NET_ADMIN" in unit and "NoNewPrivileges=no" in unit
    ctx = json.loads(k8s_text(relaxed))
    assert '"allowPrivilegeEscalation": true' in json.dumps(ctx) and '"NET_ADMIN"' in json.dumps(ctx)


def test_systemd_units_are_contained(tmp_path) -> None:  # type: ignore[no-untyped-def]
    unit = unit_text(tmp_path, specs()["db"])
    for line in hardening_lines({}):
        assert line in unit.splitlines(), line
    assert "CapabilityBoundingSet=" + " ".join("CAP_" + c for c in DEFAULT_CAPS) in unit
    assert "NoNewPrivileges=yes" in unit and "PrivateDevices=yes" in unit and "ProtectSystem=strict" in unit


def test_k8s_containers_are_contained() -> None:
    for name, spec in specs(local_address=lambda c: c).items():
        objects = json.loads(k8s_text(spec))
        containers = [c for o in objects if o["kind"] in ("Deployment", "StatefulSet")
                      for c in o["spec"]["template"]["spec"]["containers"]]
        assert containers, name
        for c in containers:
            ctx = c["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["capabilities"] == {"drop": ["ALL"], "add": DEFAULT_CAPS}, name
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, name
