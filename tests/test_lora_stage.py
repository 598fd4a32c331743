"""Stage 1 through the real `deepspeed --hostfile` launcher: 2 CPU ranks, ZeRO-3, gloo, the tiny model.

A run killed mid-way (SIGKILL to rank 1) and started again resumes from its latest checkpoint and ends
with the same adapter as an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from torch.testing import assert_close

from launcher.artifacts import summary_file
from tests.conftest import REPO
from tests.launch import finish, launch, logged, rank_pid, rewind, write_config

pytestmark = pytest.mark.integration  # starts subprocesses (the launcher or scripts): not in make test-fast

STEPS, SAVE_EVERY = 30, 4


def _write_config(tmp: Path, data: Path, run: Path) -> Path:
    return write_config(tmp / f"{run.name}.yaml", data_dir=str(data), run_dir=str(run),
                        llm={"model": "tiny", "max_length": 160},
                        lora={"micro_batch": 2, "grad_accum": 2, "max_steps": STEPS, "save_every": SAVE_EVERY,
                              "eval_every": 10, "eval_rows": 24, "eval_batch": 8, "shuffle_buffer": 50, "r": 8,
                              "lr": 1e-3, "warmup_steps": 2},
                        deepspeed={"zero_stage": 3})  # auto would pick 0 on one CPU host; this test keeps ZeRO-3


@pytest.fixture(scope="module")
def runs(ml100k_out: Path, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("lora")
    whole, killed = tmp / "whole", tmp / "killed"
    whole_proc = launch(_write_config(tmp, ml100k_out, whole), "lora")
    finish(whole_proc)

    cfg = _write_config(tmp, ml100k_out, killed)
    proc = launch(cfg, "lora")
    latest = killed / "lora" / "ckpt" / "latest.json"
    deadline = time.time() + 600
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    pid = rank_pid(cfg, 1)
    assert pid is not None and proc.poll() is None, "the run ended before it could be killed"
    os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert not (killed / "lora" / "adapter").exists()
    finish(launch(cfg, "lora"))
    return {"whole": whole, "killed": killed}


def test_killed_run_resumes_to_the_same_adapter(runs: dict[str, Path]) -> None:
    summary = json.loads((runs["killed"] / summary_file("lora")).read_text())
    whole = json.loads((runs["whole"] / summary_file("lora")).read_text())
    assert summary["resumed_from"] >= SAVE_EVERY and summary["steps"] == STEPS
    assert summary["train_tokens"] == whole["train_tokens"] > 0
    a = load_file(runs["whole"] / "lora" / "adapter" / "adapter_model.safetensors")
    b = load_file(runs["killed"] / "lora" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # training moved B away from 0
    for key in a:
        assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_run_artifacts(runs: dict[str, Path]) -> None:
    from peft import PeftConfig
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lora = runs["whole"] / "lora"
    summary = json.loads((runs["whole"] / summary_file("lora")).read_text())
    assert summary["world"] == 2 and summary["zero_stage"] == 3 and len(summary["memory_per_rank"]) == 2
    assert summary["valid"]["overall"]["rows"] == 24 and summary["zero_shot_valid"]["overall"]["rows"] == 24
    assert PeftConfig.from_pretrained(str(lora / "adapter")).r == 8
    assert (lora / "adapter" / "tokenizer_config.json").is_file()
    events = EventAccumulator(str(runs["whole"] / "tb" / "lora")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "valid/overall/auc",
            "valid/overall/uauc"} <= tags
    assert len(events.Scalars("train/loss")) == STEPS
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs[0] == pytest.approx(1e-3 / 3) and lrs[1] == pytest.approx(2e-3 / 3)  # each step's own lr: warmup 2,
    assert lrs[2] == pytest.approx(1e-3) and lrs[-1] < max(lrs)  # then cosine decay
    assert 1 <= len(list((lora / "ckpt").glob("step*"))) <= 2  # keep_checkpoints


def test_the_written_adapter_is_the_best_trained_one_on_valid(runs: dict[str, Path], tmp_path: Path,
                                                             ml100k_out: Path) -> None:
    """Selection on valid, as in TALLRec: of the validations at steps 10, 20 and 30 (step 0, zero-shot, is only
    reported) the best is written, and stage eval of the written adapter scores that AUC on the same rows."""
    import shutil

    from launcher.artifacts import EVAL_METRICS

    summary = json.loads((runs["whole"] / summary_file("lora")).read_text())
    trained = [p for p in summary["curve"] if p["step"] > 0]
    assert [p["step"] for p in trained] == [10, 20, 30]
    best = max(trained, key=lambda p: p["overall_auc"])  # the first of equal ones
    assert summary["best_step"] == best["step"] and summary["valid"]["overall"]["auc"] == best["overall_auc"]
    assert summary["last_valid"]["overall"]["auc"] == trained[-1]["overall_auc"]
    run = shutil.copytree(runs["whole"], tmp_path / "whole", ignore=shutil.ignore_patterns("ckpt"))
    finish(launch(_write_config(tmp_path, ml100k_out, run), "eval", 2, "--set", "eval.model=lora", "--set",
                  "eval.splits=[valid]", "--set", "eval.rows=24", "--set", "eval.baselines=[]"))
    scored = json.loads((run / EVAL_METRICS).read_text())["valid"]["overall"]
    assert scored["rows"] == 24 and scored["auc"] == pytest.approx(best["overall_auc"], abs=1e-4)


def test_a_run_out_of_time_trains_no_further_step(runs: dict[str, Path], tmp_path: Path, ml100k_out: Path) -> None:
    """The last step and its validation are checkpointed, so launching a finished (or time-stopped) run again with its
    time budget spent trains nothing and rewrites nothing: not the adapter, not the summary (so the stages after it
    stay current for `--stage all`), not a point of the curve."""
    import shutil

    run = shutil.copytree(runs["whole"], tmp_path / "whole")
    files = [run / "lora" / "adapter" / "adapter_model.safetensors", run / summary_file("lora")]
    before = [(f.read_bytes(), f.stat().st_mtime_ns) for f in files]
    latest = json.loads((run / "lora" / "ckpt" / "latest.json").read_text())
    summary = json.loads((run / summary_file("lora")).read_text())
    assert latest["step"] == latest["curve"][-1]["step"] == summary["steps"] == STEPS  # the last validation is in it
    assert (latest["best_step"], latest["last_valid"]) == (summary["best_step"], summary["last_valid"])
    out = finish(launch(_write_config(tmp_path, ml100k_out, run), "lora", 2, "--set", f"lora.max_steps={STEPS + 10}",
                        "--set", "lora.max_minutes=0.0001"))
    assert "this run already finished with these settings; nothing is trained or rewritten" in out
    assert [(f.read_bytes(), f.stat().st_mtime_ns) for f in files] == before
    for record in ("config.yaml", "provenance.json"):  # the record of the run that made them, not of this launch
        assert (run / "lora" / record).read_bytes() == (runs["whole"] / "lora" / record).read_bytes()


def test_train_batches_are_seeded_parts_of_one_global_stream(ml100k_out: Path) -> None:
    """Rank r's micro-batch b is the r-th part of the global micro-batch b that 1 rank draws with micro_batch x world
    (length grouping on): the stream depends on the global micro-batch, not on the world size; seeded; ranks disjoint."""
    from itertools import islice

    from launcher.data import train_batches

    def take(micro_batch: int, rank: int, world: int, seed: int = 1) -> list[list[int]]:
        stream = train_batches(ml100k_out, "train", lambda s: s["row_id"], micro_batch, rank, world, seed, 100,
                               length=lambda s: len(s["title"]))
        return list(islice(stream, 60))

    encoded: list[int] = []
    stream = train_batches(ml100k_out, "train", lambda s: encoded.append(s["row_id"]) or s["row_id"], 4, 1, 2, 1, 100,
                           length=lambda s: len(s["title"]))
    drawn = [r for b in islice(stream, 60) for r in b]
    assert sorted(encoded) == sorted(drawn) and len(drawn) == 240  # a rank encodes its part only
    encoded.clear()
    resumed = train_batches(ml100k_out, "train", lambda s: encoded.append(s["row_id"]) or s["row_id"], 4, 1, 2, 1, 100,
                            length=lambda s: len(s["title"]), skip=45)
    assert [r for b in islice(resumed, 15) for r in b] == drawn[45 * 4:] and len(encoded) == 60  # skipped: not encoded
    one, parts = take(8, 0, 1), [take(4, rank, 2) for rank in (0, 1)]
    assert one == [a + b for a, b in zip(*parts, strict=True)] and take(8, 0, 1) == one
    assert take(8, 0, 1, seed=2) != one
    rows0 = {r for b in parts[0] for r in b}
    assert len(rows0) == 240 and not rows0 & {r for b in parts[1] for r in b}


def test_the_length_key_orders_samples_as_their_encoded_length(ml100k_out: Path) -> None:
    """`length_key` (the titles' token counts) differs from a prompt's encoded length by the template's constant, give
    or take a token per title shown (inside a prompt a title may tokenize one token longer or shorter)."""
    from itertools import islice

    from launcher.data import read_shard
    from llm.config import LLMConfig
    from llm.model import load_base
    from llm.prompts import encode, length_key
    from pipeline.schema import shard_urls

    _, tokenizer = load_base(LLMConfig(model="tiny"))
    samples = [s for s in islice(read_shard(shard_urls(ml100k_out, "train")[0]), 400) if s["history_titles"]]
    for history in (0, 3):
        key = length_key(tokenizer, history)
        gaps = [len(encode(tokenizer, s, "lora", "movie", 512, history).prompt) - key(s) for s in samples]
        assert max(gaps) - min(gaps) <= 2 * (history + 1), (history, min(gaps), max(gaps))
        assert len({key(s) for s in samples}) > 10  # titles of many lengths: the bound above says something


def three_shards(ml100k_out: Path, tmp_path: Path) -> Path:
    """A prep output whose train split is the first three shards of ML-100K's (the rest linked, not copied)."""
    manifest = json.loads((ml100k_out / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"] = manifest["splits"]["train"]["shards"][:3]
    out = tmp_path / "three-shards"
    out.mkdir()
    for child in ml100k_out.iterdir():
        if child.name != "manifest.json":
            (out / child.name).symlink_to(child)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_an_epoch_on_two_ranks_covers_every_row_once_whatever_the_shard_count(ml100k_out: Path, tmp_path: Path) -> None:
    """Three train shards on two ranks: the first epoch's global micro-batches hold every row once but the fewer than
    one global micro-batch (8) left over; the next epoch starts afresh with every row."""
    from itertools import islice

    from launcher.data import read_shard, train_batches
    from pipeline.schema import shard_urls

    out = three_shards(ml100k_out, tmp_path)
    rows = [s["row_id"] for url in shard_urls(out, "train") for s in read_shard(url)]
    per_epoch = len(rows) // 8
    streams = [list(islice(train_batches(out, "train", lambda s: s["row_id"], 4, rank, 2, 0, 50), 2 * per_epoch))
               for rank in (0, 1)]
    for epoch in (0, 1):
        seen = [r for stream in streams for batch in stream[epoch * per_epoch:(epoch + 1) * per_epoch] for r in batch]
        assert len(seen) == len(set(seen)) == 8 * per_epoch and set(seen) <= set(rows) and len(rows) - len(seen) < 8


def test_a_split_smaller_than_a_global_micro_batch_stops_every_rank(ml100k_out: Path, tmp_path: Path) -> None:
    """The usable train rows (those with a history, as stage 1 drops the others) must fill one global micro-batch
    (micro_batch x ranks): the launch stops on every rank before training, naming the keys; the stream alone raises
    too. One global micro-batch's worth of rows is enough: every epoch is then that one batch."""
    from launcher.data import kept_count, short_epoch, train_batches, usable

    out = three_shards(ml100k_out, tmp_path)
    usable_rows = kept_count(out, "train", True)
    assert 0 < usable_rows < kept_count(out, "train", False)  # the dropped rows count
    keep = usable(True)
    whole = train_batches(out, "train", lambda s: s["row_id"], usable_rows, 0, 1, 0, 50, keep)
    assert sorted(next(whole)) == sorted(next(whole))  # each epoch is the one global micro-batch of every usable row
    with pytest.raises(ValueError, match="fewer usable samples than one global micro-batch"):
        next(train_batches(out, "train", lambda s: s["row_id"], usable_rows // 2 + 1, 1, 2, 0, 50, keep))
    run = tmp_path / "short"
    cfg = write_config(tmp_path / "short.yaml", data_dir=str(out), run_dir=str(run), llm={"model": "tiny"},
                       lora={"micro_batch": usable_rows // 2 + 1, "max_steps": 2, "eval_every": 0})
    proc = launch(cfg, "lora")
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0
    message = short_epoch(out, "train", usable_rows // 2 + 1, 2)
    assert all(f"[lora, rank {rank}] {message}" in output for rank in (0, 1)), output[-3000:]
    assert not (run / "lora" / "ckpt").exists()
    # nothing made: no record of the settings that failed, so the corrected launch is no "change" to start over from
    assert not (run / "lora" / "config.yaml").exists() and not (run / "lora" / "provenance.json").exists()


def test_one_and_two_ranks_train_the_same_adapter(ml100k_out: Path, tmp_path: Path) -> None:
    """The same global micro-batch of 4 on 1 rank (4 each) and on 2 ranks (2 each), ZeRO 0, the whole-sequence loss
    (each rank's rows hold a different number of tokens) and LoRA dropout 0 (each rank draws the masks of its part):
    the same loss and gradient norm at every logged step (every 2nd) and the same adapter. The 2-rank run's checkpoint
    of step 3, resumed on 1 rank, ends at the 1-rank run's adapter too (the world size is no key of stage 1 under ZeRO
    0), and logs the same loss points."""
    from launcher.artifacts import ADAPTER

    def config(name: str, micro_batch: int) -> Path:
        return write_config(tmp_path / f"{name}.yaml", data_dir=str(ml100k_out), run_dir=str(tmp_path / name),
                            llm={"model": "tiny", "max_length": 160},
                            lora={"micro_batch": micro_batch, "grad_accum": 2, "max_steps": 6, "save_every": 3,
                                  "keep_checkpoints": 2, "eval_every": 0, "eval_rows": 8, "eval_batch": 8, "log_every": 2,
                                  "shuffle_buffer": 50, "r": 8, "dropout": 0.0, "lr": 1e-2, "warmup_steps": 0,
                                  "loss": "sequence"},
                            deepspeed={"zero_stage": 0})

    one, two = tmp_path / "one", tmp_path / "two"
    finish(launch(config("one", 4), "lora", 1))
    finish(launch(config("two", 2), "lora", 2))
    for tag in ("train/loss", "train/grad_norm"):
        a, b = logged(one, tag, "lora"), logged(two, tag, "lora")
        assert len(a) == 3 and b == pytest.approx(a, rel=1e-4) and min(a) > 0, tag
    assert len(set(logged(one, "train/loss", "lora"))) > 1
    a = load_file(one / ADAPTER / "adapter_model.safetensors")
    assert any(v.abs().max() > 1e-3 for k, v in a.items() if "lora_B" in k)  # trained away from B = 0
    resumed = rewind(two, tmp_path / "resumed", "lora", 3)
    finish(launch(config("resumed", 4), "lora", 1))
    assert json.loads((resumed / summary_file("lora")).read_text())["resumed_from"] == 3
    # the checkpoint of step 3 carried step 3's loss: the point of step 4 averages steps 3 and 4, as without the resume
    assert logged(resumed, "train/loss", "lora") == pytest.approx(logged(one, "train/loss", "lora"), rel=1e-4)
    for run in (two, resumed):
        b = load_file(run / ADAPTER / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"{run.name}: {key}")


def test_a_checkpoint_deepspeed_cannot_load_stops_the_run(runs: dict[str, Path], tmp_path: Path,
                                                          ml100k_out: Path) -> None:
    """latest.json names a tag whose engine files are gone: DeepSpeed would return (None, None) and train on from
    fresh weights; the stage must stop and say so."""
    import shutil

    run = tmp_path / "broken"
    shutil.copytree(runs["whole"], run)
    tag = json.loads((run / "lora" / "ckpt" / "latest.json").read_text())["tag"]
    for engine_file in (run / "lora" / "ckpt" / tag).glob("*_states.pt"):
        engine_file.unlink()
    proc = launch(_write_config(tmp_path, ml100k_out, run), "lora")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2
    assert f"{run / 'lora' / 'ckpt' / tag}: latest.json points at a checkpoint that could not be loaded" in out


def test_cli_names_a_missing_prep_output(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "launcher" / "train.py"), "--config",
                           str(REPO / "configs" / "ml-100k.yaml"), "--stage", "lora", "--data", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and (f"{tmp_path}/manifest.json: no prep output there; make it first: spark-submit "
                                     f"pipeline/prep.py --config {REPO / 'configs' / 'ml-100k.yaml'} --output {tmp_path}"
                                     ) in proc.stderr


def test_cli_names_prompts_longer_than_the_prepped_histories(ml100k_out: Path) -> None:
    """llm.history_titles beyond what prep kept per sample (protocol.history_len) would show fewer titles silently."""
    proc = subprocess.run([sys.executable, str(REPO / "launcher" / "train.py"), "--config",
                           str(REPO / "configs" / "ml-100k.yaml"), "--stage", "lora", "--data", str(ml100k_out),
                           "--set", "llm.history_titles=11"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (f"error: {ml100k_out}: its samples hold the last 10 history titles (protocol.history_len), fewer than "
            "llm.history_titles 11") in proc.stderr


def test_a_finished_stage_names_another_prep_output_and_takes_a_copy(runs: dict[str, Path], tmp_path: Path,
                                                                      ml100k_out: Path) -> None:
    """provenance.json records the prep output a stage ran on: the stage launched on another one (prep run again:
    another `created`) stops with the data named, while a copy of the same output, however new its files, is the
    same data (the finished run has nothing left to do)."""
    import shutil

    from pipeline.schema import MANIFEST

    run = shutil.copytree(runs["whole"], tmp_path / "whole")
    cfg = _write_config(tmp_path, ml100k_out, run)
    recorded = json.loads((run / "lora" / "provenance.json").read_text())["data"]
    manifest = json.loads((ml100k_out / MANIFEST).read_text())
    assert recorded == {"path": str(ml100k_out), "name": manifest["name"], "created": manifest["created"]}

    def prep_copy(name: str, created: str) -> Path:
        copy = tmp_path / name
        copy.mkdir()
        for child in ml100k_out.iterdir():
            if child.name != MANIFEST:
                (copy / child.name).symlink_to(child)
        (copy / MANIFEST).write_text(json.dumps({**manifest, "created": created}))
        return copy

    proc = launch(cfg, "lora", 2, "--data", str(prep_copy("again", "2030-01-01T00:00:00+00:00")))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0 and "stage lora ran with other settings that change its model (data (the prep " \
        "output): {'path'" in out, out[-3000:]
    out = finish(launch(cfg, "lora", 2, "--data", str(prep_copy("copy", manifest["created"]))))
    assert "this run already finished with these settings; nothing is trained or rewritten" in out


def test_a_title_too_long_for_max_length_stops_every_rank_before_training(ml100k_out: Path, tmp_path: Path) -> None:
    """Every rank refuses, naming the item, a target title whose prompt cannot fit llm.max_length even without history,
    before training: met mid-run by the one rank whose share holds the row, it would stop that rank alone while the
    others wait in a collective (on other hosts, until the process group times out)."""
    from launcher.data import item_titles
    from llm.config import LLMConfig
    from llm.model import load_base
    from llm.prompts import answer_room, prompt_ids

    _, tokenizer = load_base(LLMConfig(model="tiny"))
    titles = item_titles(ml100k_out)
    need = {i: len(prompt_ids(tokenizer, "lora", "movie", [], t)) + answer_room(tokenizer) for i, t in titles.items()}
    longest = max(need, key=need.get)
    run = tmp_path / "too-long"
    cfg = write_config(tmp_path / "too-long.yaml", data_dir=str(ml100k_out), run_dir=str(run),
                       llm={"model": "tiny", "max_length": need[longest] - 1}, lora={"max_steps": 2, "eval_every": 0})
    proc = launch(cfg, "lora")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"error: [lora, rank {rank}] item {longest} (" in out and f"llm.max_length={need[longest] - 1}" in out
    assert not (run / "lora" / "ckpt").exists()
