"""Stage 2a through the real `deepspeed --hostfile` launcher: 2 CPU ranks, the tiny model with a LoRA adapter.

A run killed mid-way resumes without recomputing the chunks it finished and ends with the same semantic
table as an uninterrupted run; each vector is the final hidden state at the prompt's last position.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from launcher.artifacts import summary_file
from tests.launch import finish, launch, tiny_adapter, write_config

LLM = {"model": "tiny", "max_length": 64, "tiny": {"hidden": 128, "layers": 4, "intermediate": 256}}
DISTILL = {"batch": 2, "chunk_items": 4}


def _config(tmp: Path, data: Path, run: Path) -> Path:
    tiny_adapter(run, LLM)
    return write_config(tmp / f"{run.name}.yaml", data_dir=str(data), run_dir=str(run), llm=LLM, distill=DISTILL)


@pytest.fixture(scope="module")
def runs(ml100k_out: Path, tmp_path_factory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("distill")
    whole, killed = tmp / "whole", tmp / "killed"
    finish(launch(_config(tmp, ml100k_out, whole), "distill"))

    cfg = _config(tmp, ml100k_out, killed)
    proc = launch(cfg, "distill")
    chunks = killed / "distill" / "chunks"
    deadline = time.time() + 600
    while len(list(chunks.glob("*.safetensors"))) < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    done = {p.name: p.stat().st_mtime_ns for p in chunks.glob("*.safetensors")}
    assert proc.returncode != 0 and not (killed / "semantic.safetensors").exists()
    finish(launch(cfg, "distill"))
    return {"whole": whole, "killed": killed, "done_at_kill": done}


def test_killed_run_skips_finished_chunks_and_matches(runs: dict[str, object]) -> None:
    killed, done = runs["killed"], runs["done_at_kill"]
    summary = json.loads((killed / summary_file("distill")).read_text())
    assert 6 <= len(done) < summary["chunks"]
    assert summary["skipped_chunks"] == len(done)
    assert summary["computed_items"] == summary["items"] - len(done) * DISTILL["chunk_items"]
    for name, mtime in done.items():  # finished chunks were not written again
        assert (killed / "distill" / "chunks" / name).stat().st_mtime_ns == mtime
    a, b = load_file(runs["whole"] / "semantic.safetensors"), load_file(killed / "semantic.safetensors")
    assert_close(b["semantic"], a["semantic"], rtol=0, atol=1e-6)
    assert torch.equal(a["item_ids"], b["item_ids"])


@pytest.mark.parametrize("change", ["chunk size", "adapter"])
def test_a_resume_with_other_chunks_recomputes_instead_of_misreading_them(
        runs: dict[str, object], ml100k_out: Path, tmp_path: Path, change: str) -> None:
    """Chunk files of size 4 must not stand in for chunks of size 8 (items 8c..8c+7, not 4c..4c+3), nor chunks
    distilled through an earlier adapter (stage 1 trained again) for this one's."""
    from safetensors.torch import save_file

    run = tmp_path / "resumed"
    shutil.copytree(runs["killed"], run)
    (run / "semantic.safetensors").unlink()
    distill = DISTILL
    if change == "chunk size":
        distill = {**DISTILL, "chunk_items": 2 * DISTILL["chunk_items"]}
    else:
        weights = run / "lora" / "adapter" / "adapter_model.safetensors"
        save_file({k: 2 * v for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    cfg = write_config(tmp_path / "resumed.yaml", data_dir=str(ml100k_out), run_dir=str(run), llm=LLM, distill=distill)
    finish(launch(cfg, "distill"))
    summary = json.loads((run / summary_file("distill")).read_text())
    assert summary["skipped_chunks"] == 0 and summary["computed_items"] == summary["items"]
    a, b = load_file(runs["whole"] / "semantic.safetensors"), load_file(run / "semantic.safetensors")
    if change == "chunk size":
        assert_close(b["semantic"], a["semantic"], rtol=0, atol=1e-6)
    else:
        assert not torch.allclose(b["semantic"], a["semantic"])


def test_a_finished_run_launched_again_rewrites_nothing_unless_its_source_changed(
        runs: dict[str, object], ml100k_out: Path, tmp_path: Path) -> None:
    """Every chunk and the merged table of the same source are there: nothing is rewritten (so stage 2b, made after
    it, stays current). With the prompt length changed (the guard overridden), the chunks are of another source and
    every one is recomputed (here to the same vectors: these prompts are shorter than either length)."""
    run = tmp_path / "again"
    shutil.copytree(runs["whole"], run)
    files = [run / "semantic.safetensors", run / summary_file("distill")]
    before = [(f.read_bytes(), f.stat().st_mtime_ns) for f in files]
    cfg = write_config(tmp_path / "again.yaml", data_dir=str(ml100k_out), run_dir=str(run), llm=LLM, distill=DISTILL)
    out = finish(launch(cfg, "distill"))
    assert "this run already finished with these settings; nothing is trained or rewritten" in out
    assert [(f.read_bytes(), f.stat().st_mtime_ns) for f in files] == before
    finish(launch(cfg, "distill", 2, "--set", "llm.max_length=48", "--allow-config-change"))
    summary = json.loads((run / summary_file("distill")).read_text())
    assert summary["skipped_chunks"] == 0 and summary["computed_items"] == summary["items"]
    earlier = json.loads((runs["whole"] / summary_file("distill")).read_text())["source_digest"]
    assert summary["source_digest"] != earlier and (run / "semantic.safetensors").stat().st_mtime_ns > before[0][1]
    again, first = load_file(run / "semantic.safetensors"), load_file(runs["whole"] / "semantic.safetensors")
    assert torch.equal(again["item_ids"], first["item_ids"])
    assert_close(again["semantic"], first["semantic"], rtol=0, atol=1e-6)


def test_one_rank_distills_the_same_table_as_two(runs: dict[str, object], ml100k_out: Path, tmp_path: Path) -> None:
    """The chunks are the same on any world size (rank r takes chunks r, r + world, ...): the table does not
    depend on the number of ranks."""
    run = tmp_path / "one"
    cfg = _config(tmp_path, ml100k_out, run)
    finish(launch(cfg, "distill", 1))
    a, b = load_file(runs["whole"] / "semantic.safetensors"), load_file(run / "semantic.safetensors")
    assert torch.equal(a["item_ids"], b["item_ids"])
    assert_close(b["semantic"], a["semantic"], rtol=0, atol=1e-6)


def test_merge_refuses_chunks_that_miss_items(runs: dict[str, object]) -> None:
    from launcher.recipes.distillation import merge

    chunks = sorted((runs["whole"] / "distill" / "chunks").glob("*.safetensors"))
    ids = load_file(runs["whole"] / "semantic.safetensors")["item_ids"].numpy()
    with pytest.raises(ValueError, match=r"vectors for \d+ items \(missing ids \[\d+"):
        merge(chunks[:-1], ids, runs["whole"] / "never-written.safetensors", {})
    assert not (runs["whole"] / "never-written.safetensors").exists()


def test_vectors_are_last_position_hidden_states(runs: dict[str, object], ml100k_out: Path) -> None:
    from peft import PeftModel

    from launcher.data import read_items
    from llm.config import LLMConfig
    from llm.model import load_base
    from llm.prompts import encode_distill

    out = load_file(runs["whole"] / "semantic.safetensors")
    items = read_items(ml100k_out)
    assert out["semantic"].dtype == torch.float32 and out["semantic"].shape == (items.item_id.max() + 1, 128)
    assert out["item_ids"].tolist() == items.item_id.tolist() and not out["semantic"][0].any()
    model, tokenizer = load_base(LLMConfig(**LLM))
    model = PeftModel.from_pretrained(model, str(runs["whole"] / "lora" / "adapter")).eval()
    for item_id, title in zip(items.item_id[:5], items.title[:5], strict=True):
        ids = torch.tensor([encode_distill(tokenizer, "movie", title, 64)])
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
        assert_close(out["semantic"][item_id], hidden, rtol=1e-4, atol=1e-5)


def test_distill_without_adapter_names_the_missing_stage(ml100k_out: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", data_dir=str(ml100k_out), run_dir=str(tmp_path / "run"), llm=LLM)
    proc = launch(cfg, "distill", 1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and f"{tmp_path / 'run' / 'lora' / 'adapter'}: not found; run --stage lora first" in out
