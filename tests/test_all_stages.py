"""`--stage all` through the real `deepspeed --hostfile` launcher (2 CPU ranks, tiny model, ML-100K): every
stage in one job, a rerun that skips the finished stages, and ranking with the trained run, new items included."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from launcher.artifacts import COLLAB_FILE, DONE, EVAL_METRICS
from tests.conftest import REPO
from tests.launch import finish, free_port, launch, write_config

pytestmark = pytest.mark.integration  # starts subprocesses (the launcher or scripts): not in make test-fast

LLM = {"model": "tiny", "max_length": 160}
BUDGET = {
    "lora": {"max_steps": 2, "micro_batch": 2, "grad_accum": 1, "eval_every": 0, "eval_rows": 16, "save_every": 2},
    "distill": {"batch": 64, "chunk_items": 1024},
    "collab": {"dim": 16, "proj_hidden": 32, "max_steps": 6, "eval_every": 3, "batch": 512, "projector_items": 0},
    "sella": {"max_steps": 2, "micro_batch": 2, "grad_accum": 1, "eval_every": 0, "eval_rows": 16, "lr": 1e-3},
    "eval": {"rows": 24, "batch": 8},
}


@pytest.fixture(scope="module")
def run(ml100k_out: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    base = tmp_path_factory.mktemp("all")
    cfg = write_config(base / "all.yaml", data_dir=str(ml100k_out), run_dir=str(base / "run"), llm=LLM, **BUDGET)
    out = finish(launch(cfg, "all", 2), timeout=900)
    return cfg, base / "run", out


def test_all_runs_every_stage_and_prints_the_results(run: tuple[Path, Path, str]) -> None:
    _, run_dir, out = run
    for stage, rel in DONE.items():
        assert (run_dir / rel).is_file(), stage
        assert f"[all] {stage}: finished\n" in out and "finished artifacts found" not in out
    metrics = json.loads((run_dir / EVAL_METRICS).read_text())
    assert metrics["model"] == "sella" and metrics["test"]["overall"]["rows"] == 24
    assert "results of model sella and its baselines on the same rows (AUC / UAUC)" in out
    assert f"| test | sella | 24 | {metrics['test']['overall']['auc']:.4f}" in out
    for baseline in ("popularity", "mf"):  # configs/ml-100k.yaml: eval.baselines, scored on the same rows
        m = metrics["baselines"][baseline]["test"]["overall"]
        ci = m["auc_ci"]
        assert m["rows"] == 24 and f"| test | {baseline} | 24 | {m['auc']:.4f}" in out and f"{ci[0]:.3f} - {ci[1]:.3f}" in out
    # in a SeLLa-Rec run the mf baseline is stage 2b's aligned tables, and says so
    assert metrics["baseline_sources"]["mf"].endswith(f"{COLLAB_FILE} (align weight 1.0)")
    assert f"baseline mf ({metrics['baseline_sources']['mf']}) on the same rows" in out


def test_all_skips_finished_stages(run: tuple[Path, Path, str]) -> None:
    cfg, run_dir, _ = run
    before = (run_dir / DONE["sella"]).stat().st_mtime_ns
    out = finish(launch(cfg, "all", 2))
    for stage in DONE:
        assert f"[all] {stage}: finished artifacts found" in out
    assert (run_dir / DONE["sella"]).stat().st_mtime_ns == before
    assert "results of model sella" in out


def test_a_stage_older_than_an_earlier_one_stops_all_and_names_the_command(run: tuple[Path, Path, str],
                                                                            tmp_path: Path) -> None:
    """Stage 2b ran again after stage 3 finished: `--stage all` would resume stage 3's finished run and keep tables
    trained on the old ones, so it stops and says how to run stage 3 and eval again; so does `--stage sella`, and
    so it does when stage 3 was killed with a checkpoint older than the tables."""
    import os
    import shutil

    import yaml

    cfg, run_dir, _ = run
    copy = shutil.copytree(run_dir, tmp_path / "run")
    (tmp_path / "all.yaml").write_text(yaml.safe_dump(yaml.safe_load(cfg.read_text()) | {"run_dir": str(copy)}))
    later = (copy / DONE["sella"]).stat().st_mtime + 60
    os.utime(copy / DONE["collab"], (later, later))
    proc = launch(tmp_path / "all.yaml", "all", 2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-3000:]
    assert (f"[all] {copy / DONE['sella']} is older than {copy / DONE['collab']}: prep or an earlier stage ran again "
            "after sella finished or checkpointed") in out and "--stage sella,eval --fresh" in out
    assert (copy / DONE["sella"]).stat().st_mtime < later  # nothing ran
    (copy / DONE["sella"]).unlink()  # as a run killed after its last checkpoint leaves it
    proc = launch(tmp_path / "all.yaml", "sella", 2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-3000:]
    assert (f"[sella] {copy / 'sella' / 'ckpt' / 'latest.json'} is older than {copy / DONE['collab']}") in out
    assert not (copy / DONE["sella"]).exists()


@pytest.mark.parametrize("stage", ["all", "sella"])
def test_a_row_that_takes_upstream_stages_run_with_other_settings_stops(stage: str, run: tuple[Path, Path, str],
                                                                          ml100k_out: Path, tmp_path: Path) -> None:
    """`--stage all` on a row whose upstream finished stages 1-2 skips them and uses their artifacts, so its own
    settings of those stages must be the upstream's: a row asking for LoRA r=4 is told, before anything runs. So is
    `--stage sella` alone, which reads the same adapter (it trained stage 3 on it, unchecked)."""
    _, run_dir, _ = run
    cfg = write_config(tmp_path / "row.yaml", data_dir=str(ml100k_out), run_dir=str(tmp_path / "row"),
                       upstream=str(run_dir), llm=LLM, **(BUDGET | {"lora": BUDGET["lora"] | {"r": 4}}))
    proc = launch(cfg, stage, 2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-3000:]
    assert (f"{run_dir / 'lora' / 'config.yaml'}: this run takes stage lora from its upstream run, which ran it with "
            "other settings (lora.r: 64 -> 4)") in out
    assert not (tmp_path / "row" / "sella").exists()


def test_a_row_whose_upstream_stage_is_stale_is_told_to_run_it_again_there(run: tuple[Path, Path, str],
                                                                          ml100k_out: Path, tmp_path: Path) -> None:
    """Prep ran again after the upstream run's stage 1: `--fresh` in the row would not touch the upstream's adapter,
    so the error names the upstream's stages and the config they ran with, not `--fresh` here (which looped)."""
    import shutil

    _, run_dir, _ = run
    upstream = shutil.copytree(run_dir, tmp_path / "up", ignore=shutil.ignore_patterns("ckpt"))
    os.utime(upstream / DONE["lora"], (1_000_000_000, 1_000_000_000))  # 2001: before the prep output was made
    cfg = write_config(tmp_path / "row.yaml", data_dir=str(ml100k_out), run_dir=str(tmp_path / "row"),
                       upstream=str(upstream), llm=LLM, **BUDGET)
    proc = launch(cfg, "all", 2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-3000:]
    assert f"[all] {upstream / DONE['lora']} is older than {ml100k_out / 'manifest.json'}" in out
    assert (f"It is the upstream run's ({upstream}), which --fresh here does not touch: run it there again with the "
            f"config it ran with, launcher/train.py --config {upstream / 'lora' / 'config.yaml'} --run-dir {upstream} "
            f"--data {ml100k_out} --stage lora,distill,collab --fresh") in out  # the copy's record names the original
    assert not (tmp_path / "row" / "lora").exists()


def rank(cfg: Path, candidates: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    """launcher/rank.py for user 7 of the run."""
    return subprocess.run([sys.executable, "launcher/rank.py", "--config", str(cfg), "--user", "7", "--candidates",
                           str(candidates), "--out", str(out), *flags], cwd=REPO, capture_output=True, text=True,
                          check=False)


def test_rank_scores_a_never_seen_item_from_its_title(run: tuple[Path, Path, str], tmp_path: Path) -> None:
    cfg, _, _ = run
    candidates = tmp_path / "candidates.csv"
    pd.DataFrame({"item_id": [50, 100, None, None],
                  "title": [None, None, "A Film Nobody Has Rated (2031)", "Another Unseen Picture (2032)"]}
                 ).to_csv(candidates, index=False)
    out = tmp_path / "ranked.parquet"
    proc = rank(cfg, candidates, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranked = pd.read_parquet(out)
    assert list(ranked["rank"]) == [1, 2, 3, 4] and ranked.score.is_monotonic_decreasing
    assert ranked.score.between(0, 1).all() and ranked.score.nunique() == 4
    new = ranked[ranked.new_item]
    assert sorted(new.title) == ["A Film Nobody Has Rated (2031)", "Another Unseen Picture (2032)"]
    assert (new.item_id == 0).all()
    assert set(ranked[~ranked.new_item].item_id) == {50, 100}


def test_a_new_items_warm_id_is_its_title_distilled_as_in_stage_2a(run: tuple[Path, Path, str], ml100k_out: Path,
                                                                     tmp_path: Path) -> None:
    """rank.py's `<Warm_ID>` input of a new item is stage 2a's vector of its title: a known item's title offered
    without its id gets the row stage 2a wrote for that item, not the row stages 2b and 3 trained from it; the
    item offered by id gets the trained row."""
    from safetensors.torch import load_file
    from torch.testing import assert_close

    from embeddings.collab import SEMANTIC
    from embeddings.tables import TableFile
    from launcher.artifacts import SELLA_TABLES, SEMANTIC_FILE, adapter_dir
    from launcher.config import Config
    from launcher.data import read_items
    from launcher.rank import read_candidates, warm_inputs
    from llm.model import load_tuned
    from pipeline.config import load_config

    cfg_path, run_dir, _ = run
    cfg = load_config(cfg_path, schema=Config)
    items = read_items(ml100k_out)
    title = dict(zip(items.item_id, items.title, strict=True))
    offered = tmp_path / "offered.csv"
    pd.DataFrame({"item_id": [50, None, None], "title": [None, title[50], title[100]]}).to_csv(offered, index=False)
    candidates = read_candidates(offered, items).set_axis([7, 3, 5])  # positions count, not index labels
    assert candidates.new_item.tolist() == [False, True, True]
    stage1, tokenizer = load_tuned(cfg.llm, adapter_dir(cfg, run_dir))
    warm = warm_inputs(cfg, run_dir, candidates, TableFile(run_dir / SELLA_TABLES), stage1, tokenizer)
    distilled = load_file(run_dir / SEMANTIC_FILE)["semantic"]
    trained = TableFile(run_dir / SELLA_TABLES).rows(SEMANTIC, torch.tensor([50]))
    assert (trained[0] - distilled[50]).abs().max() > 1e-3  # the two sources differ, so the check below can fail
    assert torch.equal(warm[0], trained[0])
    assert_close(warm[1:], distilled[[50, 100]], atol=1e-4, rtol=1e-4)


def test_rank_names_the_bad_candidate_line(run: tuple[Path, Path, str], tmp_path: Path) -> None:
    cfg, _, _ = run
    candidates = tmp_path / "bad.csv"
    candidates.write_text("item_id,title\n50,\n999999,\n")
    proc = rank(cfg, candidates, tmp_path / "x.parquet")
    assert proc.returncode == 2 and f"{candidates}, line 3: item_id 999999 is not in the data" in proc.stderr
    candidates.write_text("item_id,title\n50,\ntt0113277,\n")  # a raw id, not the prep output's remapped one
    proc = rank(cfg, candidates, tmp_path / "x.parquet")
    assert proc.returncode == 2 and f"{candidates}, line 3: item_id 'tt0113277' is not an integer" in proc.stderr
    candidates.write_text("item_id,title\n50,\n\n," + "Film " * 200 + "\n")  # a new title too long for any prompt
    proc = rank(cfg, candidates, tmp_path / "x.parquet")
    assert proc.returncode == 2 and f"{candidates}, line 4: the prompt without history needs" in proc.stderr
    other = json.loads((run[1] / "sella" / "provenance.json").read_text())["data"]  # the prep output it trained on
    copy = tmp_path / "again"  # prep run again: the same files, another `created`
    shutil.copytree(other["path"], copy)
    manifest = json.loads((copy / "manifest.json").read_text()) | {"created": "2031-01-01T00:00:00+00:00"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    candidates.write_text("item_id,title\n50,\n")
    proc = rank(cfg, candidates, tmp_path / "x.parquet", "--data", str(copy))
    assert proc.returncode == 2 and "stage sella trained on another prep output" in proc.stderr, proc.stderr[-2000:]
    assert f"pass the --data it trained on ({other['path']}" in proc.stderr and not (tmp_path / "x.parquet").exists()


def test_rank_refuses_prompts_other_than_the_trained_ones(run: tuple[Path, Path, str], tmp_path: Path) -> None:
    """As stage eval does: scores of 5-title prompts from a model trained on 3 would be reported as its; and new items
    distilled otherwise than stage 2a distilled the trained ones would carry other <Warm_ID> vectors."""
    cfg, _, _ = run
    candidates = tmp_path / "candidates.csv"
    candidates.write_text("item_id,title\n50,\n")
    proc = rank(cfg, candidates, tmp_path / "x.parquet", "--set", "llm.history_titles=5")
    assert proc.returncode == 2 and "llm.history_titles: 3 -> 5" in proc.stderr, proc.stderr[-2000:]
    assert "--allow-config-change" in proc.stderr and not (tmp_path / "x.parquet").exists()
    candidates.write_text("item_id,title\n50,\n,A Film Never Rated (2031)\n")  # a new item: distilled as in stage 2a
    proc = rank(cfg, candidates, tmp_path / "x.parquet", "--set", "distill.use_lora=false")
    assert proc.returncode == 2 and "rank distills new items with other settings than stage 2a distilled the trained " \
        "ones (distill.use_lora: True -> False)" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "x.parquet").exists()
    candidates.write_text("item_id,title\n50,\n")  # no new item, nothing distilled: the key does not matter
    assert rank(cfg, candidates, tmp_path / "x.parquet", "--set", "distill.use_lora=false").returncode == 0


def test_candidates_are_read_as_written_and_named_by_their_line(tmp_path: Path) -> None:
    """No type guessing: a title "1984" in a column with a blank stays "1984" (pandas made it 1984.0), "None" is a
    title, an id "5.7" is refused (pandas cut it to 5); lines are the file's own, blank lines and a title quoted over
    two lines counted; a title holding a special token, or a short row, is named."""
    from launcher.rank import read_candidates

    items = pd.DataFrame({"item_id": [1, 5], "title": ["Heat (1995)", "Fargo (1996)"]})
    candidates = tmp_path / "c.csv"
    candidates.write_text('\ufeff\nitem_id,title\n5,\n  \n,1984\n,None\n,"Two\nlines"\n1.0,\n')  # BOM, as Excel writes; 1.0: pandas' id with gaps
    read = read_candidates(candidates, items)
    assert read[["item_id", "title", "new_item"]].values.tolist() == [
        [5, "Fargo (1996)", False], [0, "1984", True], [0, "None", True], [0, "Two\nlines", True], [1, "Heat (1995)", False]]
    assert read["where"].tolist() == [f"{candidates}, line {n}" for n in (3, 5, 6, 7, 9)]  # blank lines skipped
    for body, line, says in [('item_id,title\n\n,"a\nb"\n5.7,\n', 5, "item_id '5.7' is not an integer"),
                             ("item_id,title\n,The <Item_ID> film\n", 2, "holds one of the prompt's special tokens"),
                             ("item_id,title\n5\n", 2, "1 fields, the header has 2 (item_id, title)"),
                             ("item_id,title\n5,\n,Caf\xe9\n", 3, "not UTF-8 (invalid continuation byte at byte 21)"),
                             ('item_id,title\n,"Foo (1999)\n5,\n1,\n', 2, "unexpected end of data")]:  # an unclosed quote
        candidates.write_bytes(body.encode("latin-1"))
        with pytest.raises(ValueError, match=re.escape(f"{candidates}, line {line}: ") + ".*" + re.escape(says)):
            read_candidates(candidates, items)
    parquet = tmp_path / "c.parquet"
    pd.DataFrame({"item_id": [5.0, 5.7], "title": [None, None]}).to_parquet(parquet)
    with pytest.raises(ValueError, match=re.escape(f"{parquet}, row 2: item_id 5.7 is not an integer")):
        read_candidates(parquet, items)


def test_an_empty_candidates_file_is_named(tmp_path: Path) -> None:
    from launcher.rank import read_candidates

    candidates = tmp_path / "empty.csv"
    candidates.write_text("item_id,title\n")
    with pytest.raises(ValueError, match=f"{candidates}: no candidates"):
        read_candidates(candidates, pd.DataFrame({"item_id": [1], "title": ["Heat (1995)"]}))


ZERO3_THEN_TORCHREC = """
import sys
from transformers.integrations import HfDeepSpeedConfig
from launcher.config import Config
from launcher.dist import setup
from launcher.engine import ds_config
from launcher.train import load_recipes
from llm.model import hidden_size, load_base
from pipeline.config import load_config
cfg = load_config("configs/ml-100k.yaml", ["deepspeed.zero_stage=3"], schema=Config)
d = setup(cfg.deepspeed)
if sys.argv[1] == "recipes-first":
    load_recipes(("lora", "collab"))
keep = HfDeepSpeedConfig(ds_config(cfg.deepspeed, cfg.lora, d, hidden_size(cfg.llm)))
load_base(cfg.llm, d.dtype)
import embeddings.collab
print("torchrec imported")
"""


@pytest.mark.parametrize("order, ok", [("recipes-first", True), ("model-first", False)])
def test_recipes_are_imported_before_a_zero3_model_load(order: str, ok: bool) -> None:
    """The DeepSpeed trap --stage all avoids (load_recipes): SmolLM2 loaded under zero.Init, then TorchRec."""
    env = {**os.environ, "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", ZERO3_THEN_TORCHREC, order], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False)
    assert ("torchrec imported" in proc.stdout) is ok, proc.stderr[-2000:]
    if not ok:
        assert "ShardedModule' has no attribute '__parameters__'" in proc.stderr
