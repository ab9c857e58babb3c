"""The Docker engine source exports every image a build needs in one ``docker save`` (shared layers once).

A fake engine stands in for dockerd (the real one is covered by tests/integration/test_build_docker.py): it
serves real ``docker save`` archives written by tests.helpers.images and records every export asked of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from bundle_builder.images import DockerEngineSource, ImageError, OciLayoutSource, Platform, resolve
from tests.helpers.images import TestImage, sample_images, write_docker_archive, write_oci_layout

AMD64 = Platform.parse("linux/amd64")
ARM64 = Platform.parse("linux/arm64")


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
    """The few Engine API calls the source makes; ``exports`` records the names of each export."""

    def __init__(self, by_id: dict[str, TestImage], spool: Path) -> None:
        self._by_id = by_id
        self._spool = spool
        self.exports: list[list[str]] = []

    def _archive(self, names: list[str]) -> Iterator[bytes]:
        self.exports.append(list(names))
        path = write_docker_archive(self._spool / f"export-{len(self.exports)}.tar",
                                    [self._by_id[n] for n in names])
        yield path.read_bytes()

    def get_image(self, name: str) -> Iterator[bytes]:
        return self._archive([name])

    def _url(self, path: str) -> str:
        return path

    def _get(self, url: str, params: dict[str, Any], stream: bool) -> list[str]:
        assert url == "/images/get" and stream
        return list(params["names"])

    def _raise_for_status(self, res: list[str]) -> None:
        return None

    def _stream_raw_result(self, res: list[str], chunk_size: int, decode: bool) -> Iterator[bytes]:
        return self._archive(res)


class _Client:
    def __init__(self, images: list[TestImage], spool: Path) -> None:
        self.images = _Images({i.ref: i for i in images})
        self.api = _Api({i.config_digest: i for i in images}, spool)


@pytest.fixture
def engine(tmp_path: Path) -> tuple[DockerEngineSource, _Client, list[TestImage]]:
    sample = sample_images()
    images = [sample.api["amd64"], sample.web["amd64"]]
    client = _Client(images, tmp_path)
    return DockerEngineSource(client=client, spool_dir=str(tmp_path)), client, images


def test_one_export_for_every_image_of_the_build(engine) -> None:  # type: ignore[no-untyped-def]
    source, client, images = engine
    try:
        got = resolve([i.ref for i in images], [AMD64], [source])
        assert client.api.exports == [[i.config_digest for i in images]], "one docker save of both images"
        for image in images:
            resolved = got[(image.ref, AMD64)]
            assert resolved.config.digest == image.config_digest
            assert [layer.digest for layer in resolved.layers] == image.diff_ids
        spooled = list(Path(source._spool or "").iterdir())  # pylint: disable=protected-access
        assert len(spooled) == 1, f"one spooled archive, not one per image: {spooled}"
    finally:
        source.close()


def test_images_taken_from_an_earlier_source_are_not_exported(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, client, images = engine
    api, web = images
    layout = write_oci_layout(tmp_path / "oci", [api])
    try:
        got = resolve([api.ref, web.ref], [AMD64], [OciLayoutSource(str(layout)), source])
        assert got[(api.ref, AMD64)].source != "docker" and got[(web.ref, AMD64)].source == "docker"
        assert client.api.exports == [[web.config_digest]]
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
