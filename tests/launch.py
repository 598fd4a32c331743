"""Starting launcher/train.py through the real `deepspeed` launcher from tests (CPU ranks, gloo)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from launcher.artifacts import summary_file
from tests.conftest import REPO, config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, name: str = "ml-100k", **overrides: Any) -> Path:
    """configs/<name>.yaml with nested overrides, written to `path`."""
    path.write_text(yaml.safe_dump(config(name, **overrides).model_dump(mode="json")))
    return path


def launch(cfg: Path, stage: str, ranks: int = 2, *extra: str) -> subprocess.Popen:
    """`deepspeed --hostfile` (localhost slots=ranks) running one stage; stdout and stderr piped together.

    Starts a new process session, so a test can kill the whole job with os.killpg.
    """
    hostfile = cfg.parent / f"hostfile{ranks}"
    hostfile.write_text(f"localhost slots={ranks}\n")
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh_check",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(REPO / "launcher" / "train.py"), "--config", str(cfg), "--stage", stage, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def rank_pid(cfg: Path, rank: int) -> int | None:
    """The pid of the training process of `rank` started with config `cfg`."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if str(cfg).encode() in cmd and f"--local_rank={rank}".encode() in cmd:
            return int(proc.name)
    return None


def tiny_adapter(run: Path, llm: dict[str, Any]) -> None:
    """A stage-1 adapter at <run>/lora/adapter for the tiny model, with seeded random (non-zero) LoRA weights and
    stage 1's default dropout (a frozen adapter must not draw dropout masks in stage 3: ranks would differ)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from llm.config import LLMConfig
    from llm.model import load_base

    model, _ = load_base(LLMConfig(**llm))
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.05,
                                             init_lora_weights=False))
    peft.save_pretrained(str(run / "lora" / "adapter"))


def tiny_collab(path: Path, data_dir: Path, dim: int, llm_dim: int, hidden: int = 32, semantic: bool = True) -> Path:
    """A stage-2b collab.safetensors for the prep output `data_dir`: seeded random user/item tables and,
    with `semantic`, a semantic table and Proj_C->L (the shapes stage 3 reads)."""
    import torch

    from embeddings.tables import save_tensors
    from launcher.data import largest_ids
    from llm.projector import proj_c_to_l

    users, items = largest_ids(data_dir)
    g = torch.Generator().manual_seed(0)
    tensors = {"user": torch.randn(users + 1, dim, generator=g) * 0.1, "item": torch.randn(items + 1, dim, generator=g) * 0.1}
    if semantic:
        tensors["semantic"] = torch.randn(items + 1, llm_dim, generator=g)
        torch.manual_seed(0)
        tensors |= {f"projector.{k}": v for k, v in proj_c_to_l(dim, hidden, llm_dim).state_dict().items()}
    save_tensors(path, tensors, {})
    return path


def read_tables_checkpoint(tag_dir: Path) -> dict:
    """A TableState checkpoint (torch.distributed.checkpoint) read offline, whatever the world size that wrote it:
    {"model": {state dict key: full tensor}, "fused": {...}}."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tag_dir.parent / f"{tag_dir.name}-tables.pt"
    dcp_to_torch_save(tag_dir / "tables", out)
    return torch.load(out, weights_only=False)


def table_weights(state: dict) -> dict:
    """{table name: full weight} from read_tables_checkpoint's model state dict."""
    return {k.split(".")[-2]: v for k, v in state["model"].items() if k.endswith(".weight") and "embedding_bags" in k}


def logged(run: Path, tag: str, stage: str = "sella") -> list[float]:
    """The values `stage` wrote to TensorBoard under `tag`, one per logged step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [e.value for e in EventAccumulator(str(run / "tb" / stage)).Reload().Scalars(tag)]


def rewind(src: Path, dst: Path, stage: str, step: int) -> Path:
    """A copy of run `src` as it stood at its checkpoint of `step`: later checkpoints and the stage's summary
    removed, latest.json pointing at that checkpoint again (its loop state is kept beside it). `ckpt/best` and
    the exports stay the source run's (a best state of a later step cannot be rebuilt), so a test of a rewound
    run compares step checkpoints, not exports or best states."""
    import shutil

    shutil.copytree(src, dst)
    ckpt = dst / stage / "ckpt"
    for tag in ckpt.glob("step*"):
        if tag.is_dir() and int(tag.name[4:]) > step:
            shutil.rmtree(tag)
    (ckpt / "latest.json").write_text((ckpt / f"step{step:08d}" / "state.json").read_text())
    (dst / summary_file(stage)).unlink(missing_ok=True)
    return dst

