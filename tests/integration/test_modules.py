"""The collection's modules run through the ansible command, as a user runs them: changed then not changed,
check mode writes nothing, errors name the problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_site_repo import tree_hash, vendor  # noqa: F401  (module-scoped bundles fixture)
from tests.helpers.bundles import trust_args

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def collections_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ansible finds the collection at <path>/ansible_collections/offline/delivery: link the checkout there."""
    root = tmp_path_factory.mktemp("collections")
    target = root / "ansible_collections" / "offline"
    target.mkdir(parents=True)
    (target / "delivery").symlink_to(REPO_ROOT)
    return root


def run_module(collections: Path, module: str, args: dict, *extra: str,
               env_extra: dict[str, str] | None = None) -> tuple[int, dict]:
    """Run one module on localhost with the ``ansible`` command; returns rc and the module's result."""
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(collections), ANSIBLE_LOCALHOST_WARNING="false",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="false", ANSIBLE_PYTHON_INTERPRETER=sys.executable,
               ANSIBLE_LOAD_CALLBACK_PLUGINS="1")
    env.update(env_extra or {})
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible"), "localhost", "-i", "localhost,",
                           "-c", "local", "-o", "-m", f"offline.delivery.{module}", "-a", json.dumps(args), *extra],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("localhost | ")), None)
    if line is None or "=> " not in line:
        raise AssertionError(f"no result from ansible (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.returncode, json.loads(line.split("=> ", 1)[1])


def _import_args(bundle: Path, repo: Path, pub: Path) -> dict:
    return {"path": str(bundle), "repo_root": str(repo), **trust_args(pub)}


def test_bundle_import_check_then_changed_then_unchanged(vendor, collections_path, tmp_path):  # noqa: F811
    repo = tmp_path / "repo"
    pub = vendor["dir"] / "vendor.pub"
    args = _import_args(vendor["full"], repo, pub)

    rc, res = run_module(collections_path, "bundle_import", args, "--check")
    assert rc == 0 and res["changed"] and "would be imported" in res["msg"]
    assert not repo.exists(), "check mode must write nothing"

    rc, res = run_module(collections_path, "bundle_import", args)
    assert rc == 0 and res["changed"], res
    assert res["release"]["name"] == "mini" and res["release"]["blobs_new"] > 0

    rc, res = run_module(collections_path, "bundle_import", args)
    assert rc == 0 and not res["changed"], res

    rc, res = run_module(collections_path, "bundle_import", _import_args(vendor["delta"], repo, pub))
    assert rc == 0 and res["changed"] and res["release"]["version"] == "1.1.0"


def test_bundle_import_refuses_untrusted_bundle_and_names_the_key(vendor, collections_path, tmp_path):  # noqa: F811
    repo = tmp_path / "repo"
    other = vendor["dir"] / "other.pub"
    rc, res = run_module(collections_path, "bundle_import", _import_args(vendor["full"], repo, other))
    assert rc != 0 and "msg" in res
    assert "repository unchanged" in res["msg"] and "not one of the trusted keys" in res["msg"]
    assert tree_hash(repo) == "absent"


def _export_args(vendor: dict, dest: Path, **extra: object) -> dict:  # noqa: F811
    args = {"model": str(vendor["dir"] / "app-1.0.0.yml"), "dest": str(dest),
            "images_from": [f"oci:{vendor['layout']}"], "platforms": ["linux/amd64", "linux/arm64"],
            "sign_key": str(vendor["key"])}
    args.update(extra)
    return args


def test_bundle_export_is_idempotent_by_content(vendor, collections_path, tmp_path):  # noqa: F811
    dest = tmp_path / "bundles"
    rc, res = run_module(collections_path, "bundle_export", _export_args(vendor, dest), "--check")
    assert rc == 0 and res["changed"] and "would be written: new bundle" in res["msg"]
    assert not list(dest.glob("*.bundle*")), "check mode must leave nothing in dest"

    rc, res = run_module(collections_path, "bundle_export", _export_args(vendor, dest))
    assert rc == 0 and res["changed"], res
    bundle = dest / "mini-1.0.0.bundle"
    first = bundle.read_bytes()
    assert res["bundle"]["path"] == str(bundle)
    # the same code as the CLI: the module's bundle is byte-identical to the one the fixture built
    assert first == vendor["full"].read_bytes()

    rc, res = run_module(collections_path, "bundle_export", _export_args(vendor, dest))
    assert rc == 0 and not res["changed"] and "up to date" in res["msg"]
    assert res["previous_manifest_digest"] == res["bundle"]["manifest_digest"]
    assert bundle.read_bytes() == first
    assert not [p for p in dest.iterdir() if p.name.startswith(".export-")], "staging left behind"

    rc, res = run_module(collections_path, "bundle_export", _export_args(vendor, dest, volume_size="150K"))
    assert rc == 0 and res["changed"] and "split into other parts" in res["msg"]
    assert not bundle.exists() and (dest / "mini-1.0.0.bundle.parts.json").exists()


def test_bundle_export_names_the_missing_image(vendor, collections_path, tmp_path):  # noqa: F811
    model = tmp_path / "app.yml"
    model.write_text((vendor["dir"] / "app-1.0.0.yml").read_text().replace("mini/cache:1.0.0", "mini/nope:9.9.9"))
    rc, res = run_module(collections_path, "bundle_export", _export_args(vendor, tmp_path / "b", model=str(model)))
    assert rc != 0 and "mini/nope:9.9.9" in res["msg"]


def test_bundle_export_takes_the_cli_build_options(vendor, collections_path, tmp_path):  # noqa: F811
    """files, have + have_pub, packages, package_profiles: what bundle-builder build takes, checked by the same
    code (build_bundle), so the messages are the CLI's."""
    from offline_delivery_core.bundle.format import HAVE_MEDIA_TYPE, read_head
    from offline_delivery_core.site import have as site_have

    tool = tmp_path / "tool"
    tool.write_bytes(b"#!/bin/sh\necho tool\n")
    tool.chmod(0o755)
    rc, res = run_module(collections_path, "bundle_export",
                         _export_args(vendor, tmp_path / "f", files=[f"tool@2.0/arm64={tool}"]))
    assert rc == 0 and res["changed"], res
    files = read_head(res["bundle"]["path"]).manifest["files"]
    assert files["tool/arm64"]["version"] == "2.0" and files["tool/arm64"]["mode"] == "0755"
    rc, res = run_module(collections_path, "bundle_export",
                         _export_args(vendor, tmp_path / "f2", files=[f"tool/s390x={tool}"]))
    assert rc != 0 and "architecture 's390x' is not one of the --platform architectures" in res["msg"]

    # a site's have-list holding the 1.0.0 blobs, signed by the site key; the vendor pinned north.have.pub
    seed = bytes(range(32))
    blobs = sorted({b["digest"] for b in read_head(str(vendor["full"])).manifest["blobs"]})
    have = tmp_path / "north.have.json"
    have.write_bytes(site_have.signed_bytes({"mediaType": HAVE_MEDIA_TYPE, "site": "north", "releases": [],
                                             "blobs": blobs}, seed))
    pinned, other = tmp_path / "north.have.pub", tmp_path / "other.have.pub"
    pinned.write_bytes(site_have.public_key_pem(site_have.public_from_seed(seed)))
    other.write_bytes(site_have.public_key_pem(site_have.public_from_seed(bytes(32))))
    args = _export_args(vendor, tmp_path / "h", model=str(vendor["dir"] / "app-1.1.0.yml"), have=str(have))
    rc, res = run_module(collections_path, "bundle_export", {**args, "have_pub": [str(other)]})
    assert rc != 0 and "not the site key given" in res["msg"], res
    assert not list((tmp_path / "h").glob("*.bundle*")), "a refused have-file writes no bundle"
    forged = tmp_path / "forged.have.json"
    forged.write_text(json.dumps(dict(json.loads(have.read_bytes()), blobs=blobs[1:])))
    rc, res = run_module(collections_path, "bundle_export", {**args, "have": str(forged), "have_pub": [str(pinned)]})
    assert rc != 0 and "modified after the site signed it" in res["msg"], res
    rc, res = run_module(collections_path, "bundle_export", {**args, "have_pub": [str(pinned)]})
    assert rc == 0 and res["changed"] and res["bundle"]["blobs_bundled"] < res["bundle"]["blobs_total"], res
    assert read_head(res["bundle"]["path"]).manifest["delta"]["have"]["file"] == "north.have.json"
    rc, res = run_module(collections_path, "bundle_export", _export_args(vendor, tmp_path / "h2",
                                                                         have_pub=[str(pinned)]))
    assert rc != 0 and "missing parameter(s) required by 'have_pub': have" in res["msg"], res

    rc, res = run_module(collections_path, "bundle_export", _export_args(vendor, tmp_path / "p",
                                                                         packages=["plan9-4"]))
    assert rc != 0 and "unknown distro 'plan9-4'" in res["msg"], res


def test_bundle_export_refuses_a_builder_of_another_version(vendor, collections_path, tmp_path):  # noqa: F811
    """The pip-installed builder is not the collection's files: another version (or none) is named, with what to
    install. The module runs on the venv's base Python (this venv's editable install would shadow PYTHONPATH)."""
    base_python = getattr(sys, "_base_executable", "") or "/usr/bin/python3"
    fake = tmp_path / "site-packages" / "bundle_builder"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "0.1.0"\n')  # an older package: nothing else imports
    env = {"ANSIBLE_PYTHON_INTERPRETER": base_python, "PYTHONPATH": str(fake.parent)}
    rc, res = run_module(collections_path, "bundle_export", _export_args(vendor, tmp_path / "b"), env_extra=env)
    assert rc != 0, res
    assert "offline-delivery Python package where this module runs is version 0.1.0" in res["msg"], res
    assert "the offline.delivery collection is 0.2.0" in res["msg"], res
    assert f"{base_python} -m pip install 'offline-delivery==0.2.0'" in res["msg"], res
    assert (res["builder_version"], res["collection_version"]) == ("0.1.0", "0.2.0")
    assert not (tmp_path / "b").exists()

    has_builder = subprocess.run([base_python, "-c", "import bundle_builder"], cwd=tmp_path, capture_output=True,
                                 check=False)
    if has_builder.returncode != 0:  # and none at all: what to install, not a traceback to read
        rc, res = run_module(collections_path, "bundle_export", _export_args(vendor, tmp_path / "b"),
                             env_extra={"ANSIBLE_PYTHON_INTERPRETER": base_python})
        assert rc != 0 and "offline-delivery==0.2.0" in res["msg"] and "pip install" in res["msg"], res


def test_bundle_info_verifies_and_names_a_tampered_blob(vendor, collections_path, tmp_path):  # noqa: F811
    pub = str(vendor["dir"] / "vendor.pub")
    rc, res = run_module(collections_path, "bundle_info", {"path": str(vendor["split"]), **trust_args(pub)})
    assert rc == 0 and not res["changed"] and res["verified"]
    assert res["bundle"]["name"] == "mini" and res["bundle"]["components"] == ["cache", "web"]
    assert res["bundle"]["platforms"] == ["linux/amd64", "linux/arm64"] and res["bundle"]["signed"]

    from tests.unit.test_site_repo import _flip_byte_in_last_blob
    bad = tmp_path / "mini-1.0.0.bundle"
    _flip_byte_in_last_blob(vendor["full"], bad)
    rc, res = run_module(collections_path, "bundle_info", {"path": str(bad), **trust_args(pub)})
    assert rc != 0 and "blobs/sha256/" in res["msg"] and "tampered" in res["msg"]

    rc, res = run_module(collections_path, "bundle_info", {"path": str(bad)})
    assert rc != 0 and "no vendor key is pinned" in res["msg"]
    rc, res = run_module(collections_path, "bundle_info", {"path": str(bad), "verify": False,
                                                          "require_signature": False})
    assert rc == 0 and not res["verified"] and res["bundle"]["version"] == "1.0.0"


def test_debian_arch_filter_is_the_one_arch_map(collections_path):
    """The roles' architecture checks use this filter (common/arch.py): the machine names Ansible reports,
    aliases, and an empty string for what the product does not support."""
    cases = {"x86_64": "amd64", "aarch64": "arm64", "amd64": "amd64", "linux/arm64": "arm64", "riscv64": "",
             "ppc64le": ""}
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(collections_path), ANSIBLE_LOCALHOST_WARNING="false",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="false", ANSIBLE_PYTHON_INTERPRETER=sys.executable,
               ANSIBLE_LOAD_CALLBACK_PLUGINS="1")
    expr = "{{ %s | map('offline.delivery.debian_arch') | list }}" % json.dumps(list(cases))
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible"), "localhost", "-i", "localhost,", "-c",
                           "local", "-o", "-m", "ansible.builtin.debug", "-a", f"msg={expr}"],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(proc.stdout.split("=> ", 1)[1])["msg"]
    assert dict(zip(cases, got)) == cases
