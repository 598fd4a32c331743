"""Shared fixtures: one real local Spark session per pytest process (`make test` runs two workers), paths to
../shared/data, prep helpers."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from launcher.config import Config
from pipeline.config import load_config, merge, parse_config
from pipeline.spark import get_spark

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SELLAREC_SHARED_DATA", REPO.parent / "shared" / "data"))
CONFIGS = REPO / "configs"


def needs_shared(folder: str, *files: str) -> pytest.MarkDecorator:
    """Skip when a file of ../shared/data/<folder> is absent (MovieLens terms forbid shipping it in the repo)."""
    missing = [SHARED_DATA / folder / f for f in files or ("",) if not (SHARED_DATA / folder / f).exists()]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(map(str, missing))}: MovieLens data is read "
                              "from ../shared/data beside the repository and never shipped with it")


def config(name: str, **overrides: Any) -> Config:
    """A full config from configs/ with nested overrides (dicts merge, other values replace)."""
    base = load_config(CONFIGS / f"{name}.yaml", schema=Config).model_dump(mode="json")
    return parse_config(merge(base, overrides), schema=Config)


def local_spark():
    """A 2-core local Spark session bound to 127.0.0.1, with the test suite's small shuffle."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    return get_spark(config("ml-100k").spark.model_copy(update={"master": "local[2]", "shuffle_partitions": 4}))


@pytest.fixture(scope="session")
def spark():
    session = local_spark()
    yield session
    session.stop()


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """The embedded default data set (RecBole's ML-100K atomic files, fetched from the recbole wheel)."""
    from pipeline.assets import fetch_ml100k

    return fetch_ml100k(REPO / ".cache" / "data")


@pytest.fixture(scope="session")
def ml100k_out(spark, ml100k_dir, tmp_path_factory) -> Path:
    """ML-100K through the pipeline once per session (per worker; RecBole source), shared by several tests."""
    from pipeline.prep import run

    out = tmp_path_factory.mktemp("prep") / "ml-100k"
    run(config("ml-100k"), ml100k_dir, out)
    return out


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start Spark, and so every launcher test (its data comes through the pipeline), are marked
    `integration`, as are the modules that mark themselves (they start subprocesses); `make test-fast` runs
    the rest."""
    for item in items:
        if "spark" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
