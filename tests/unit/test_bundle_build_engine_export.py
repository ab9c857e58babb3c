"""The Docker engine source exports the images a build needs through the docker SDK's public API
(``APIClient.get_image``, one image per call) and merges the exports into one spooled ``docker save`` archive
that holds a shared layer once.

A fake engine stands in for dockerd (the real one is covered by tests/integration/test_build_docker.py): its
``api.get_image`` streams real ``docker save`` archives, in the Docker 25+ layout (blobs named by digest) or
the 20.10 one written by tests.helpers.images, and records every export asked of it. It fakes nothing else.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from bundle_builder.images import DockerEngineSource, ImageError, OciLayoutSource, Platform, resolve
from tests.helpers.images import TestImage, rootfs_layer, sample_images, sha256, write_docker_archive, write_oci_layout

AMD64 = Platform.parse("linux/amd64")
ARM64 = Platform.parse("linux/arm64")


def docker25_archive(image: TestImage) -> bytes:
    """What Docker 25+ ``docker save IMAGE_ID`` writes: an OCI layout whose blobs are named by digest, plus
    ``manifest.json`` (``Config``/``Layers`` are blob paths) and ``repositories``."""
    blobs: dict[str, bytes] = {sha256(data).split(":")[1]: data for data in [image.config_bytes(), *image.layers]}
    manifest = [{"Config": f"blobs/sha256/{image.config_digest.split(':')[1]}", "RepoTags": None,
                 "Layers": [f"blobs/sha256/{d.split(':')[1]}" for d in image.diff_ids]}]
    files = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": b'{"schemaVersion":2,"manifests":[]}',
             "manifest.json": json.dumps(manifest).encode(), "repositories": b"{}",
             **{f"blobs/sha256/{hex_}": data for hex_, data in blobs.items()}}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def docker20_archive(image: TestImage, tmp: Path) -> bytes:
    """What Docker 20.10 writes (``<id>/layer.tar``, a repeated layer as a symlink): the helper's archive."""
    return write_docker_archive(tmp / f"{image.config_digest.split(':')[1]}.tar", [image]).read_bytes()


def chunks(data: bytes, size: int = 7000) -> Iterator[bytes]:
    """The archive in odd-sized chunks, as the engine's response arrives."""
    for i in range(0, len(data), size):
        yield data[i:i + size]


class _Image:
    def __init__(self, image: TestImage) -> None:
        self.id = image.config_digest
        self.attrs = {"Os": image.os, "Architecture": image.arch, "Variant": image.variant}


class _Images:
    def __init__(self, by_ref: dict[str, TestImage]) -> None:
        self._by_ref = by_ref

    def get(self, ref: str) -> _Image:
        import docker.errors
        if ref not in self._by_ref:
            raise docker.errors.ImageNotFound(f"no such image: {ref}")
        return _Image(self._by_ref[ref])


class _Api:
    """``get_image`` (the public one-image export); ``exports`` records the id asked for by each call.
    ``stream`` turns an image into its export stream; a test swaps it to make the engine fail."""

    def __init__(self, by_id: dict[str, TestImage]) -> None:
        self._by_id = by_id
        self.exports: list[str] = []
        self.stream: Callable[[TestImage], Iterator[bytes]] = lambda image: chunks(docker25_archive(image))

    def get_image(self, image: str, chunk_size: int | None = None) -> Iterator[bytes]:
        import docker.errors
        self.exports.append(image)
        if image not in self._by_id:
            raise docker.errors.NotFound(f"404 Client Error: Not Found (\"No such image: {image}\")")
        return self.stream(self._by_id[image])


class _Client:
    def __init__(self, images: list[TestImage]) -> None:
        self.images = _Images({i.ref: i for i in images})
        self.api = _Api({i.config_digest: i for i in images})


@pytest.fixture
def engine(tmp_path: Path) -> tuple[DockerEngineSource, _Client, list[TestImage]]:
    sample = sample_images()
    images = [sample.api["amd64"], sample.web["amd64"]]  # they share the amd64 base layer
    client = _Client(images)
    return DockerEngineSource(client=client, spool_dir=str(tmp_path)), client, images


def _spooled(source: DockerEngineSource) -> list[Path]:
    return sorted(Path(source._spool or "").iterdir())  # pylint: disable=protected-access


def test_one_spooled_archive_holds_every_image_and_a_shared_layer_once(engine) -> None:  # type: ignore[no-untyped-def]
    source, client, images = engine
    try:
        got = resolve([i.ref for i in images], [AMD64], [source])
        # asked EXPORTS_AT_ONCE at a time (threads): the calls may start in any order
        assert sorted(client.api.exports) == sorted(i.config_digest for i in images), "one export per image, each once"
        for image in images:
            resolved = got[(image.ref, AMD64)]
            assert resolved.config.digest == image.config_digest and resolved.source == "docker"
            assert [layer.digest for layer in resolved.layers] == image.diff_ids
            for layer, data in zip(resolved.layers, image.layers):
                with layer.open() as fh:
                    assert fh.read() == data
        (spooled,) = _spooled(source)  # one archive, not one per image
        with tarfile.open(spooled) as tar:
            names = tar.getnames()
            manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        assert len(names) == len(set(names)), "each member written once"
        base = images[0].diff_ids[0]
        assert base == images[1].diff_ids[0]
        assert names.count(f"blobs/sha256/{base.split(':')[1]}") == 1, "the shared base layer spooled once"
        assert [e["Config"] for e in manifest] == [f"blobs/sha256/{i.config_digest.split(':')[1]}" for i in images]
    finally:
        source.close()
    assert not Path(spooled).exists(), "close() removes the spool"


def test_docker_20_10_exports_merge_too(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The 20.10 layout: layers in ``<id>/layer.tar``, a layer repeated within an image as a symlink."""
    source, client, images = engine
    twice = rootfs_layer({"same.txt": b"twice\n"})
    images[1].layers = [images[1].layers[0], twice, twice]  # web: base, X, X (X symlinked to its first copy)
    client.api = _Api({i.config_digest: i for i in images})
    client.api.stream = lambda image: chunks(docker20_archive(image, tmp_path), 4096)
    try:
        got = resolve([i.ref for i in images], [AMD64], [source])
        for image in images:
            resolved = got[(image.ref, AMD64)]
            assert [layer.digest for layer in resolved.layers] == image.diff_ids
            for layer, data in zip(resolved.layers, image.layers):
                with layer.open() as fh:
                    assert fh.read() == data
        assert len(_spooled(source)) == 1
    finally:
        source.close()


def test_images_taken_from_an_earlier_source_are_not_exported(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, client, images = engine
    api, web = images
    layout = write_oci_layout(tmp_path / "oci", [api])
    try:
        got = resolve([api.ref, web.ref], [AMD64], [OciLayoutSource(str(layout)), source])
        assert got[(api.ref, AMD64)].source != "docker" and got[(web.ref, AMD64)].source == "docker"
        assert client.api.exports == [web.config_digest]
    finally:
        source.close()


def test_missing_platform_exports_nothing_and_says_so(engine) -> None:  # type: ignore[no-untyped-def]
    source, client, images = engine
    try:
        with pytest.raises(ImageError, match="has no linux/arm64 variant"):
            resolve([images[0].ref], [ARM64], [source])
        assert client.api.exports == []
    finally:
        source.close()


def _broken_midway(image: TestImage) -> Iterator[bytes]:
    import requests.exceptions
    data = docker25_archive(image)
    yield data[:len(data) // 2]
    raise requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead")


def _truncated(image: TestImage) -> Iterator[bytes]:
    data = docker25_archive(image)
    yield data[:len(data) // 2]


def _not_a_tar(image: TestImage) -> Iterator[bytes]:
    yield b"{\"message\": \"not an archive\"}" + b"\0" * 600


@pytest.mark.parametrize("stream, why", [
    (_broken_midway, "Connection broken"),
    (_truncated, "unexpected end of data"),
    (_not_a_tar, ""),
], ids=["connection-lost", "truncated", "not-a-tar"])
def test_an_export_that_fails_names_the_image(engine, stream, why: str) -> None:  # type: ignore[no-untyped-def]
    source, client, images = engine
    web = images[1]
    real = client.api.stream
    client.api.stream = lambda image: stream(image) if image is web else real(image)
    try:
        with pytest.raises(ImageError) as err:
            resolve([i.ref for i in images], [AMD64], [source])
        message = str(err.value)
        assert f"docker: exporting image {web.ref} ({web.config_digest[:19]}) from the engine failed" in message
        assert why in message
        assert images[0].ref not in message.replace(web.ref, ""), "only the failing image is blamed"
    finally:
        source.close()


def test_engine_refusing_an_export_names_the_image(engine) -> None:  # type: ignore[no-untyped-def]
    """An image removed between lookup and export: the engine answers 404 to ``get_image``."""
    source, client, images = engine
    api = images[0]
    client.api = _Api({images[1].config_digest: images[1]})  # the engine no longer has api
    try:
        with pytest.raises(ImageError, match=rf"exporting image {api.ref} \(sha256:.*No such image"):
            resolve([api.ref], [AMD64], [source])
    finally:
        source.close()
