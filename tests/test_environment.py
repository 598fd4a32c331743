"""The installed stack is the one ../shared/docs/stack.md verified (scripts/setup.sh installs it)."""
import ast
import fnmatch
import re
import sys
import tomllib
from importlib.metadata import packages_distributions, version
from pathlib import Path

import pytest


@pytest.mark.parametrize("package, expected", [
    ("torch", "2.13.0"), ("torchrec", "1.8.0"), ("fbgemm-gpu-cpu", "1.8.0"), ("deepspeed", "0.19.8"),
    ("pyspark", "4.3.0"), ("webdataset", "1.0.2"), ("transformers", "5.23.0"), ("peft", "0.21.2"),
    ("tensorboard", "2.21.0"),
])
def test_pinned_versions(package: str, expected: str) -> None:
    assert version(package).split("+")[0] == expected


def test_deepspeed_and_torchrec_import() -> None:
    import deepspeed
    import torch
    import torchrec

    assert deepspeed.__version__.startswith("0.19.8") and torchrec.EmbeddingBagCollection
    # fbgemm's CPU operators are loaded (the torchrec --no-deps / fbgemm-gpu-cpu trap of stack.md)
    assert torch.ops.fbgemm.asynchronous_complete_cumsum(torch.tensor([1, 2, 3])).tolist() == [0, 1, 3, 6]


ROOT = Path(__file__).resolve().parents[1]


def declared_distributions() -> set[str]:
    """The distributions pyproject.toml declares: dependencies and every extra, names normalised."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [s for extra in project["optional-dependencies"].values() for s in extra]
    return {re.split(r"[=<>!~;\[ ]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def test_every_import_of_the_packages_is_declared_in_pyproject() -> None:
    """`pip install .[gpu]` must bring every module the packages import (they once lacked torchrec, safetensors and
    matplotlib); what an import needs at run time beyond its own module (gguf for the GGUF model) is listed."""
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    local = {p.split(".")[0] for p in packages}
    modules: set[str] = set()
    for package in local:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    modules.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    third_party = modules - local - set(sys.stdlib_module_names) - {"__future__"}
    providers = packages_distributions()
    needed = {providers[m][0].lower().replace("_", "-") for m in third_party} | {"gguf"}
    assert {"torch", "torchrec", "pyspark", "deepspeed"} <= needed  # the walk found the packages' imports
    assert needed - declared_distributions() == set()


def test_the_docker_context_holds_what_the_dockerfile_copies() -> None:
    """Every COPY source of the Dockerfile is a tracked path that .dockerignore leaves in the build context, and
    the context leaves out the local environment and the data (MovieLens files must not travel into an image)."""
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]

    def excluded(path: str) -> bool:
        return any(fnmatch.fnmatch(path.rstrip("/"), p) or path.startswith(p.rstrip("/") + "/") for p in ignored)

    sources = [src for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")
               for src in line.split()[1:-1]]
    assert "pipeline/" in sources and "LICENSE" in sources
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which the repository lacks"
        assert not excluded(src), f".dockerignore leaves {src} out of the context the Dockerfile copies it from"
    for local in (".venv", ".cache", "out", "data", "runs", ".gpu-payload", ".git"):
        assert excluded(local), f".dockerignore sends {local} into the build context"
