"""The installed stack is the one ../shared/docs/stack.md verified (scripts/setup.sh installs it)."""
from importlib.metadata import version

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
