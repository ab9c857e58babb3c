"""The benchmark suite must not rot: its data generator, its measuring primitives and its report, on tiny
data (seconds). The full runs are ``python -m bench.run`` (docs/benchmarks.md)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from offline_delivery_core.app.model import load_model

from bench import measure, report, run, synth
from bench.report import Row

TINY = synth.SETTINGS["tiny"]


@pytest.fixture(scope="module")
def gen(tmp_path_factory: pytest.TempPathFactory) -> synth.Generated:
    return synth.generate(TINY, tmp_path_factory.mktemp("bench-cache"))


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_blob_is_content_addressed_and_linked(gen: synth.Generated) -> None:
    index = json.loads((gen.oci / "index.json").read_text())
    refs = {d["annotations"][synth.REF_ANNOTATION]: d for d in index["manifests"]}
    assert set(refs) == set(gen.images)
    for ref, image in gen.images.items():
        for blob in image.blobs():
            path = gen.blob_path(blob.digest)
            assert _sha256(path) == blob.digest and path.stat().st_size == blob.size, (ref, blob.role)
        oci_index = json.loads(gen.blob_path(refs[ref]["digest"]).read_bytes())
        manifest = json.loads(gen.blob_path(oci_index["manifests"][0]["digest"]).read_bytes())
        config = json.loads(gen.blob_path(manifest["config"]["digest"]).read_bytes())
        assert [layer["digest"] for layer in manifest["layers"]] == config["rootfs"]["diff_ids"]
        assert [layer.digest for layer in image.layers] == config["rootfs"]["diff_ids"]
        assert (config["architecture"], config["os"]) == ("amd64", "linux")


def test_images_share_their_base_and_only_the_top_layer_changes(gen: synth.Generated) -> None:
    v1 = gen.release_images(synth.V1)
    assert len(v1) == TINY.components
    same_base = [i for i in v1 if i.base == v1[0].base]
    assert len(same_base) >= 2 and all(i.layers[:2] == v1[0].layers[:2] for i in same_base)
    unique = sum(b.size for b in gen.unique_blobs(synth.V1).values())
    assert unique < sum(b.size for i in v1 for b in i.blobs())  # dedup has something to do
    old, new = gen.changed()
    assert old.ref != new.ref and old.layers[:-1] == new.layers[:-1]
    assert old.layers[-1].digest != new.layers[-1].digest and new.layers[-1].role == "app"


def test_layers_are_real_tars_and_not_trivially_compressible(gen: synth.Generated) -> None:
    biggest = max((b for i in gen.images.values() for b in i.layers), key=lambda b: b.size)
    data = gen.blob_path(biggest.digest).read_bytes()
    with tarfile.open(gen.blob_path(biggest.digest)) as tar:
        names = tar.getnames()
    assert any(n.endswith((".conf", ".py", ".json", ".yaml", ".txt", ".html", ".js", ".xml", ".sh")) for n in names)
    ratio = len(gzip.compress(data, compresslevel=6)) / len(data)
    assert 0.5 < ratio < 0.97  # random binaries with some text: compressible a little, like real layers


def test_app_models_validate_and_point_at_the_images(gen: synth.Generated) -> None:
    for version in (synth.V1, synth.V2):
        model = load_model(yaml.safe_load(gen.app_yml(version).read_text()))
        assert model["version"] == version
        assert {c["image"] for c in model["components"].values()} == set(gen.releases[version].values())


def test_docker_archive_holds_every_image_once_per_layer(gen: synth.Generated) -> None:
    with tarfile.open(gen.docker_archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        members = {m.name: m for m in tar.getmembers()}
    assert {tag for e in manifest for tag in e["RepoTags"]} == set(gen.images)
    for entry in manifest:
        image = gen.images[entry["RepoTags"][0]]
        assert [members[p].size for p in entry["Layers"]] == [layer.size for layer in image.layers]
    layers = [n for n in members if n.endswith("/layer.tar")]
    assert len(layers) == len({layer.digest for i in gen.images.values() for layer in i.layers})


def test_generation_is_deterministic_and_cached(gen: synth.Generated, tmp_path: Path) -> None:
    again = synth.generate(TINY, tmp_path)
    assert {r: [b.digest for b in i.blobs()] for r, i in again.images.items()} == \
           {r: [b.digest for b in i.blobs()] for r, i in gen.images.items()}
    stamp = (again.root / "meta.json").stat().st_mtime_ns
    assert synth.generate(TINY, tmp_path).root == again.root
    assert (again.root / "meta.json").stat().st_mtime_ns == stamp  # served from the cache, not rewritten
    other = synth.Settings("tiny", components=2, base_sizes=(100_000,), component_size=(30_000, 40_000))
    assert other.key() != TINY.key()


def test_hash_limit_and_child_measurement(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(3 * measure.CHUNK + 17))
    nbytes, wall, cpu = measure.hash_files([blob])
    assert nbytes == blob.stat().st_size and wall > 0 and cpu >= 0
    run = measure.run_child([sys.executable, "-c", "print('hi')"])
    assert run.stdout.strip() == "hi" and run.seconds > 0
    with pytest.raises(measure.BenchError, match="exited 3"):
        measure.run_child([sys.executable, "-c", "import sys; sys.exit(3)"])


@pytest.mark.skipif(not os.access(measure.GNU_TIME, os.X_OK), reason="GNU time (/usr/bin/time) not installed")
def test_child_rss_is_the_child_alone() -> None:
    ballast = bytearray(120 * 1024 * 1024)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch it: this process is now >120 MiB resident
    small = measure.run_child([sys.executable, "-c", "pass"])
    big = measure.run_child([sys.executable, "-c", "b = bytearray(80 << 20); b[::4096] = b'x' * len(b[::4096])"])
    assert 0 < small.max_rss < 60 * 1024 * 1024  # not the parent's 120 MiB carried over by fork+exec
    assert big.max_rss > 80 * 1024 * 1024
    del ballast


def test_tree_bytes_counts_a_copy_but_not_a_link(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 10_000)
    os.link(tmp_path / "a", tmp_path / "b")
    assert measure.tree_bytes(tmp_path) == 10_000
    (tmp_path / "c").write_bytes(b"x" * 10_000)
    assert measure.tree_bytes(tmp_path) == 20_000


def test_report_goals_table_results_and_docs(tmp_path: Path) -> None:
    fast = report.check_at_least(Row("build.oci", "build", 90.0, "MB/s", "limit", 100.0, "MB/s", 0.9), 0.8)
    slow = report.check_at_least(Row("verify", "verify", 40.0, "MB/s", "limit", 100.0, "MB/s", 0.4), 0.8)
    rss = report.check_below(Row("rss", "peak RSS", 151.0, "MiB"), 150, "MiB")
    dedup = report.check_at_most(Row("dedup", "dedup overhead", 0.3, "%"), 1.0, "%")
    skipped = Row("lifecycle", "lifecycle", skipped="not landed yet")
    assert (fast.met, slow.met, rss.met, dedup.met) == (True, False, False, True)
    assert "40 points short" in slow.miss and "1.0 MiB over" in rss.miss
    rows = [fast, slow, rss, dedup, skipped]
    table = report.text_table(rows)
    assert "MISSED: 40 points short" in table and "skipped" in table and "not landed yet" in table
    doc = report.result_doc(rows, setting="tiny", date="2026-01-02T03:04:05Z",
                            machine={"cores": 2, "cpu_model": "x", "kernel": "k", "python": "3.11", "git_commit": "abc"},
                            data={"images": 3, "release": "1.0.0", "components": 3, "bases": 2, "unique_blobs": 9,
                                  "unique_bytes": 10**6, "unique_layer_bytes": 9 * 10**5, "per_image_bytes": 2 * 10**6},
                            conditions={"cache": "hot", "repeat": 3, "load_average": {"before": [1, 1, 1]}})
    path = report.append_result(tmp_path / "results", doc)
    report.append_result(tmp_path / "results", doc)
    assert path.name == "2026-01-02-tiny.json" and len(json.loads(path.read_text())) == 2
    assert [r.id for r in report.rows_from_doc(json.loads(path.read_text())[0])] == [r.id for r in rows]
    docs = tmp_path / "benchmarks.md"
    begin, end = report.BEGIN.format(setting="tiny"), report.END.format(setting="tiny")
    other = f"{report.BEGIN.format(setting='large')}\nlarge table\n{report.END.format(setting='large')}"
    docs.write_text(f"# Benchmarks\n\nhand-written intro\n\n{begin}\nold table\n{end}\n\n{other}\n\n## Analysis\nkept\n")
    report.update_docs(docs, report.docs_block(doc, "bench/results/2026-01-02-tiny.json"), "tiny")
    text = docs.read_text()
    assert "old table" not in text and "hand-written intro" in text and "## Analysis\nkept" in text
    assert "large table" in text  # another setting's block is left alone
    assert "**verify**: 40 points short" in text and "| build | 90.0 MB/s |" in text


def test_tiny_run_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole suite on tiny data through the real bundle-builder CLI (docker references off)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    rows, doc = run.run_suite(TINY, cache_root=tmp_path / "cache", repeat=1, use_docker=False,
                        only=["build", "verify", "size", "delta"])
    by_id = {r.id: r for r in rows}
    assert by_id["build.oci"].value and by_id["build.oci"].ratio and by_id["verify"].value
    assert by_id["build.oci.rss"].value and by_id["build.oci.rss"].value < 150
    assert by_id["build.floor"].ref_value and by_id["startup"].value
    assert by_id["docker.save.all"].skipped == "disabled with --no-docker"
    _, new = synth.generate(TINY, tmp_path / "cache").changed()
    assert by_id["delta.layer"].ref_value == pytest.approx(new.layers[-1].size / 1e6)
    assert by_id["delta.whole_image"].ratio < 1  # the delta carries less than the changed image whole
    assert doc["data"]["images"] == TINY.components and doc["machine"]["cores"] == os.cpu_count()
    assert not list((tmp_path / "cache").glob("work-*"))  # the work directory is cleaned up
