"""Stage `sella` through the real `deepspeed --hostfile` launcher: a DeepSpeed engine and TorchRec tables in one
process group (gloo, CPU ranks), the tiny model with a stage-1 adapter and stage-2b tables for ML-100K.

Three table set-ups: the authors' recipe (default: replicated dense-kernel tables in the projectors' AdamW,
whole-sequence loss, ZeRO `auto` = 0 on one CPU host) on 1 and 2 ranks, a run on plain MF tables (random projector,
no <Warm_ID>) whose tables train with fused row-wise Adagrad, row_wise-sharded, under ZeRO-3, and frozen tables
(`train_tables: false`, the CoLLM-like row)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.testing import assert_close

from launcher.artifacts import (
    BEST_TABLES,
    COLLAB_FILE,
    EVAL_METRICS,
    SELLA_ADAPTER,
    SELLA_PROJECTOR,
    SELLA_TABLES,
    summary_file,
)
from tests.conftest import REPO
from tests.launch import (
    finish,
    free_port,
    launch,
    logged,
    read_tables_checkpoint,
    rewind,
    table_weights,
    tiny_adapter,
    tiny_collab,
    write_config,
)

LLM = {"model": "tiny", "max_length": 160}
COLLAB = {"dim": 16, "proj_hidden": 32, "sharding": "row_wise"}
SELLA = {"max_steps": 4, "grad_accum": 2, "eval_every": 2, "eval_rows": 24, "eval_batch": 8, "warmup_steps": 0,
         "lr": 3e-2, "table_lr": 0.05, "semantic_lr": 0.05, "save_every": 2}


def prepare(run: Path, data: Path, cfg_path: Path, semantic: bool = True, zero_stage: int | str = "auto",
            **sella) -> Path:
    tiny_adapter(run, LLM)
    tiny_collab(run / COLLAB_FILE, data, COLLAB["dim"], 64, COLLAB["proj_hidden"], semantic)
    return write_config(cfg_path, data_dir=str(data), run_dir=str(run), llm=LLM, collab=COLLAB,
                        sella=SELLA | sella, eval={"rows": 24, "batch": 8}, deepspeed={"zero_stage": zero_stage})


@pytest.fixture(scope="module")
def runs(ml100k_out: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same global micro-batch of 4 on 1 rank (4 each) and on 2 ranks (2 each) with the default recipe, plus
    a run on plain MF tables (random projector, no <Warm_ID>) with fused tables training on 2 ranks, ZeRO-3.
    The lrs are set so that valid AUC moves: "one" and "two" keep their last state (step 4), "collm" an earlier
    one (step 2 of 4), saved under ZeRO-3 after a training step and copied back for the export."""
    base = tmp_path_factory.mktemp("sella")
    jobs = {
        "one": (prepare(base / "one", ml100k_out, base / "one.yaml", micro_batch=4), 1),
        "two": (prepare(base / "two", ml100k_out, base / "two.yaml", micro_batch=2), 2),
        "collm": (prepare(base / "collm", ml100k_out, base / "collm.yaml", semantic=False, zero_stage=3,
                          micro_batch=2, warm_token=False, projector_init="random", lr=1e-2,
                          table_optimizer="rowwise_adagrad", loss="answer"), 2),
    }
    shutil.copytree(base / "one" / "lora" / "adapter", base / "one" / SELLA_ADAPTER)  # an earlier train_lora run's
    for cfg, ranks in jobs.values():
        finish(launch(cfg, "sella", ranks))
    return {name: base / name for name in jobs}


@pytest.fixture(scope="module")
def valid_eval(runs: dict[str, Path]) -> dict:
    """Stage eval of the 2-rank run's export on the valid rows stage sella selected on (writes
    eval/scores-valid.parquet, read by the export tests)."""
    cfg = runs["two"].parent / "two.yaml"
    finish(launch(cfg, "eval", 2, "--set", "eval.splits=[valid]", "--set", f"eval.rows={SELLA['eval_rows']}"))
    return json.loads((runs["two"] / EVAL_METRICS).read_text())


def test_llm_loss_updates_the_sharded_tables_on_both_ranks(runs: dict[str, Path]) -> None:
    """row_wise on 2 ranks: rank 0 holds rows [0, half), rank 1 the rest; after 2 steps both ranks' shards hold
    rows the LLM loss changed, and only the rows the batches looked up."""
    before = load_file(runs["collm"] / COLLAB_FILE)
    assert set(load_file(runs["collm"] / SELLA_TABLES)) == {"user", "item"}
    saved = table_weights(read_tables_checkpoint(runs["collm"] / "sella" / "ckpt" / "step00000002"))
    for name in ("user", "item"):
        half = -(-len(before[name]) // 2)
        changed = (saved[name] != before[name]).any(1)
        for rank_rows in (changed[:half], changed[half:]):  # each rank's shard
            assert 0 < int(rank_rows.sum()) < len(rank_rows), name
    summary = json.loads((runs["collm"] / summary_file("sella")).read_text())
    assert summary["sharding"] == "row_wise" and summary["zero_stage"] == 3
    assert summary["table_optimizer"].startswith("rowwise_adagrad: FBGEMM fused")


def test_authors_recipe_one_adamw_over_tables_and_projectors(runs: dict[str, Path]) -> None:
    """Replicated tables in the AdamW: after 4 steps the looked-up rows moved by the LLM loss and every other
    row by weight decay alone ((1 - lr x 0.01) per step), as torch's AdamW treats the authors' nn.Embedding rows."""
    summary = json.loads((runs["two"] / summary_file("sella")).read_text())
    assert summary["sharding"] == "data_parallel" and summary["zero_stage"] == 0 and summary["loss"] == "sequence"
    assert summary["table_optimizer"].startswith("adamw: TorchRec dense kernel")
    before = load_file(runs["two"] / COLLAB_FILE)
    saved = table_weights(read_tables_checkpoint(runs["two"] / "sella" / "ckpt" / "step00000004"))
    for name in ("user", "item", "semantic"):
        table = saved[name]
        shrunk = before[name] * (1 - SELLA["lr"] * 0.01) ** 4
        untouched = torch.isclose(table, shrunk, rtol=1e-6, atol=1e-7).all(1)
        assert 0 < int((~untouched).sum()) < len(table), name  # the looked-up rows, and only those, learned
        assert (table - shrunk).abs()[~untouched].max() > 1e-4, name


def test_two_ranks_match_one_rank(runs: dict[str, Path]) -> None:
    assert not (runs["one"] / SELLA_ADAPTER).exists()  # removed with train_lora off: eval and rank would score it
    for rel in (SELLA_TABLES, SELLA_PROJECTOR):
        one, two = load_file(runs["one"] / rel), load_file(runs["two"] / rel)
        assert set(one) == set(two)
        for key in one:
            assert_close(two[key], one[key], rtol=1e-4, atol=1e-4)  # AdamW steps are ~lr = 3e-2
    start = load_file(runs["two"] / COLLAB_FILE)
    engine = torch.load(runs["two"] / "sella" / "ckpt" / "step00000004" / "mp_rank_00_model_states.pt",
                        weights_only=False)["module"]
    assert not torch.equal(engine["projector.a.0.weight"], start["projector.0.weight"])  # A trained from Proj_C->L
    for tag in ("train/grad_norm", "train/table_grad_norm", "train/loss"):  # the gradients' scale, not just Adam's steps
        one, two = logged(runs["one"], tag), logged(runs["two"], tag)
        assert len(one) == 4 and two == pytest.approx(one, rel=1e-4) and min(one) > 0, tag
    s1, s2 = (json.loads((runs[n] / summary_file("sella")).read_text()) for n in ("one", "two"))
    # the fixture's lr moves valid AUC and selects a trained state, so the exports compared above are not the
    # stage-2b input they start from (at lr 1e-3 every step scored the same and step 0 was exported)
    assert s1["best_step"] == s2["best_step"] > 0 and len({c["overall_auc"] for c in s2["curve"]}) > 1
    assert s1["valid"]["overall"]["auc"] == pytest.approx(s2["valid"]["overall"]["auc"], abs=1e-6)


@pytest.mark.parametrize("src, ranks, micro_batch, ref", [("two", 1, 4, "one"), ("one", 2, 2, "two")])
def test_a_checkpoint_resumes_on_another_world_size(runs: dict[str, Path], tmp_path: Path, src: str, ranks: int,
                                                    micro_batch: int, ref: str) -> None:
    """Saved at step 2 on 2 ranks and resumed on 1 (the same global micro-batch of 4), or the reverse: step 4
    equals the run that never changed its world size (tables, table optimizer, projectors)."""
    run = rewind(runs[src], tmp_path / "run", "sella", 2)
    cfg = tmp_path / "run.yaml"  # the source run's config, pointed at the copy
    cfg.write_text(yaml.safe_dump(yaml.safe_load((runs[src].parent / f"{src}.yaml").read_text()) | {"run_dir": str(run)}))
    finish(launch(cfg, "sella", ranks, "--set", f"sella.micro_batch={micro_batch}"))
    summary = json.loads((run / summary_file("sella")).read_text())
    assert summary["resumed_from"] == 2 and summary["world"] == ranks
    resumed, straight = (table_weights(read_tables_checkpoint(r / "sella" / "ckpt" / "step00000004"))
                         for r in (run, runs[ref]))
    for name in ("user", "item", "semantic"):
        assert_close(resumed[name], straight[name], rtol=1e-4, atol=1e-4, msg=name)
    a, b = (torch.load(r / "sella" / "ckpt" / "step00000004" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
            for r in (run, runs[ref]))
    keys = sorted(k for k in a if k.startswith("projector."))
    assert keys and keys == sorted(k for k in b if k.startswith("projector.")), keys
    for key in keys:
        assert_close(a[key], b[key], rtol=1e-4, atol=1e-4, msg=key)


def test_two_nodes_match_one_node_with_two_ranks(runs: dict[str, Path], ml100k_out: Path, tmp_path: Path) -> None:
    """A real two-node launch: `deepspeed --hostfile` listing two hosts (loopback addresses, one slot each),
    started once per node with `--no_ssh --node_rank 0/1`. ZeRO auto picks 3 across hosts; the model equals
    the one node's with 2 ranks (ZeRO auto = 0 there)."""
    cfg = prepare(tmp_path / "nodes", ml100k_out, tmp_path / "nodes.yaml", micro_batch=2)
    hostfile = tmp_path / "hostfile-nodes"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    port = str(free_port())
    nodes = [subprocess.Popen(
        [str(Path(sys.executable).parent / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(n),
         "--master_addr", "127.0.0.1", "--master_port", port, str(REPO / "launcher" / "train.py"), "--config", str(cfg),
         "--stage", "sella"], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True) for n in (0, 1)]
    for node in nodes:
        finish(node)
    summary = json.loads((tmp_path / "nodes" / summary_file("sella")).read_text())
    two = json.loads((runs["two"] / summary_file("sella")).read_text())
    assert summary["world"] == 2 and summary["zero_stage"] == 3 and two["zero_stage"] == 0
    assert summary["best_step"] == two["best_step"] > 0  # a trained state, not the stage-2b input
    assert [c["overall_auc"] for c in summary["curve"]] == pytest.approx([c["overall_auc"] for c in two["curve"]], abs=1e-6)
    for tag in ("train/loss", "train/grad_norm", "train/table_grad_norm"):  # every step, not only the export
        nodes_log, one_node_log = logged(tmp_path / "nodes", tag), logged(runs["two"], tag)
        assert len(nodes_log) == 4 and nodes_log == pytest.approx(one_node_log, rel=1e-4), tag
    for rel in (SELLA_TABLES, SELLA_PROJECTOR):
        nodes_out, one_node = load_file(tmp_path / "nodes" / rel), load_file(runs["two"] / rel)
        for key in one_node:
            assert_close(nodes_out[key], one_node[key], rtol=1e-4, atol=1e-4)


def test_eval_of_the_exported_model_reproduces_the_selected_valid_auc(runs: dict[str, Path], valid_eval: dict) -> None:
    """Stage eval rebuilds SellaLM from the exported tables and projector (no engine, no sharding)."""
    summary = json.loads((runs["two"] / summary_file("sella")).read_text())
    assert valid_eval["model"] == "sella" and valid_eval["valid"]["overall"]["rows"] == SELLA["eval_rows"]
    assert valid_eval["valid"]["overall"]["auc"] == pytest.approx(summary["valid"]["overall"]["auc"], abs=1e-6)
    # the selected state scores differently from the untrained one, so the stage-2b input would not pass
    assert summary["curve"][0]["overall_auc"] != pytest.approx(summary["valid"]["overall"]["auc"], abs=1e-6)
    # in TensorBoard eval's point sits on stage 3's valid curve, at the step it chose
    point = EventAccumulator(str(runs["two"] / "tb" / "eval")).Reload().Scalars("valid/overall/auc")
    assert [(e.step, e.value) for e in point] == [(summary["best_step"], pytest.approx(
        valid_eval["valid"]["overall"]["auc"], abs=1e-6))]


@pytest.mark.parametrize("name, earlier_best", [("two", False), ("collm", True)])
def test_the_exported_tables_are_the_best_valid_state(runs: dict[str, Path], name: str, earlier_best: bool) -> None:
    """The export is the state chosen on valid (ckpt/best), and not the last one when the best came earlier."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run = runs[name] / "sella"
    summary = json.loads((runs[name] / summary_file("sella")).read_text())
    assert (summary["best_step"] < summary["steps"]) == earlier_best, f"{name}: best step {summary['best_step']} of " \
        f"{summary['steps']}; the fixture's lrs are meant to cover both paths (see `runs`)"
    dcp_to_torch_save(run / "ckpt" / BEST_TABLES, run.parent / "best-tables.pt")
    best = table_weights(torch.load(run.parent / "best-tables.pt", weights_only=False))
    exported = load_file(runs[name] / SELLA_TABLES)
    assert set(best) == set(exported) and {"user", "item"} <= set(exported)
    for table in exported:
        assert torch.equal(exported[table], best[table]), table
    last = table_weights(read_tables_checkpoint(run / "ckpt" / f"step{summary['steps']:08d}"))
    moved = any(not torch.equal(exported[t], last[t]) for t in exported)
    assert moved == (summary["best_step"] != summary["steps"])
    projector, dense_best = load_file(runs[name] / SELLA_PROJECTOR), torch.load(run / "ckpt" / BEST_TABLES / "dense.pt")
    assert len(projector) == len(dense_best)  # the projector is the whole dense trainable set (no train_lora)
    assert all(any(torch.equal(v, d) for v in projector.values()) for d in dense_best)


def read_samples(data: Path, row_ids: list[int]) -> dict[int, dict]:
    """The samples of `row_ids`, read from the prep output's tar shards with tarfile alone."""
    import tarfile

    samples = {}
    for shard in sorted(data.glob("shards/*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                sample = json.loads(tar.extractfile(member).read())
                if sample["row_id"] in row_ids:
                    samples[sample["row_id"]] = sample
    return samples


def independent_scores(export: Path, data: Path, row_ids: list[int]) -> dict[int, float]:
    """P(Yes) of the given rows from the export folder alone: plain transformers + peft + safetensors + json, the
    samples read from the prep output's tar shards with tarfile; none of the project's modules."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = json.loads((export / "prompt.json").read_text())
    tok = AutoTokenizer.from_pretrained(export / "tokenizer")
    base = AutoModelForCausalLM.from_pretrained(export / "base", dtype=torch.float32)
    base.resize_token_embeddings(len(tok))
    model = PeftModel.from_pretrained(base, str(export / "adapter")).eval()
    tables, proj = load_file(export / "tables.safetensors"), load_file(export / "projector.safetensors")

    def a(x: torch.Tensor) -> torch.Tensor:
        hidden = torch.nn.functional.gelu(torch.nn.functional.linear(x, proj["a.0.weight"], proj["a.0.bias"]))
        return torch.nn.functional.linear(hidden, proj["a.2.weight"], proj["a.2.bias"])

    samples = read_samples(data, row_ids)
    out = {}
    with torch.no_grad():
        for row in row_ids:
            sample = samples[row]
            titles = sample["history_titles"][-spec["history_titles"]:]
            while True:  # prompt.json's rules, as its "render" and "fit" say
                user = spec["user"].format(titles=", ".join(f'"{t}"' for t in titles), title=f'"{sample["title"]}"')
                if spec["chat_template"]:
                    text = tok.apply_chat_template([{"role": "system", "content": spec["system"]},
                                                    {"role": "user", "content": user}], tokenize=False,
                                                   add_generation_prompt=True)
                else:
                    text = f'{spec["system"]}\n{user}\n{spec["cue"]}'
                ids = spec["leading_ids"] + tok(text, add_special_tokens=False).input_ids
                if len(ids) + spec["answer_room"] <= spec["max_length"] or not titles:
                    break
                titles = titles[1:]
            ids = torch.tensor([ids])
            emb = model.get_input_embeddings()(ids)
            vectors = {"<User_ID>": a(tables["user"][sample["user_id"]]), "<Item_ID>": a(tables["item"][sample["item_id"]]),
                       "<Warm_ID>": torch.nn.functional.linear(tables["semantic"][sample["item_id"]], proj["b.weight"],
                                                               proj["b.bias"])}
            for token, token_id in spec["special_tokens"].items():
                emb[ids == token_id] = vectors[token]
            logits = model(inputs_embeds=emb).logits[0, -1]
            no_yes = [spec["answer"]["no_token_id"], spec["answer"]["yes_token_id"]]
            out[row] = float(logits[no_yes].softmax(-1)[1])
    return out


def test_the_export_scores_anywhere(runs: dict[str, Path], ml100k_out: Path, valid_eval: dict) -> None:
    """An independent scorer written here, reading only the export folder (and the data), reproduces stage eval's
    scores; the folder carries its model card, prompt description, id maps and config."""
    export = runs["two"] / "sella" / "export"
    scores = pd.read_parquet(runs["two"] / "eval" / "scores-valid.parquet")  # written by valid_eval
    mine = independent_scores(export, ml100k_out, scores.row_id.tolist())
    assert max(abs(mine[r] - s) for r, s in zip(scores.row_id, scores.score, strict=True)) < 1e-5
    card = (export / "README.md").read_text()
    assert "| valid | 24 |" in card and "Scoring with this folder alone" in card
    manifest = json.loads((ml100k_out / "manifest.json").read_text())  # the data as prep made it, not as configured
    assert json.loads((export / "training.json").read_text())["data"] == {
        "name": manifest["name"], "created": manifest["created"], "label": "label = rating >= 4"}
    assert f"Data set `{manifest['name']}`, prepared by the CoLLM/SeLLa-Rec protocol (label = rating >= 4;" in card
    exported = yaml.safe_load((export / "config.yaml").read_text())  # the training host's paths stay behind
    assert (exported["data_dir"], exported["run_dir"]) == (None, None) and exported["sella"]["max_steps"] == 4
    assert {p.name for p in export.iterdir()} >= {"README.md", "prompt.json", "config.yaml", "tokenizer", "adapter",
                                                  "projector.safetensors", "tables.safetensors", "ids", "base"}
    assert json.loads((export / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "base"
    assert "Run it from inside this folder" in card
    from peft import AutoPeftModelForCausalLM

    here = Path.cwd()
    os.chdir(export)  # as the card says: PEFT's usual loader finds the base the adapter names from there
    try:
        assert AutoPeftModelForCausalLM.from_pretrained("adapter").get_input_embeddings().weight.shape[0] > 0
    finally:
        os.chdir(here)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(export / "tokenizer").padding_side == "left"
    assert len(pd.read_parquet(export / "ids" / "items.parquet")) == len(pd.read_parquet(ml100k_out / "tables" / "items").dropna())


def shard_export_tables(export: Path) -> None:
    """Rewrite an export's tables.safetensors as a sharded export: each table in two row pieces in two files, with
    the index embeddings.tables writes (checked against its reader, TableFile)."""
    from embeddings.tables import INDEX_FORMAT, INDEX_SUFFIX, TableFile, save_tensors

    whole = load_file(export / "tables.safetensors")
    files: dict[str, dict[str, torch.Tensor]] = {"collab-00000-of-00002.safetensors": {},
                                                 "collab-00001-of-00002.safetensors": {}}
    index: dict[str, dict] = {}
    for key, t in whole.items():
        cut = t.shape[0] // 2
        index[key] = {"shape": list(t.shape), "pieces": []}
        for (name, part), (lo, hi) in zip(files.items(), ((0, cut), (cut, t.shape[0])), strict=True):
            part[f"{key}.0"] = t[lo:hi].clone()
            index[key]["pieces"].append({"file": name, "key": f"{key}.0", "rows": [lo, hi], "cols": [0, t.shape[1]]})
    for name, part in files.items():
        save_tensors(export / name, part, {})
    (export / ("tables.safetensors" + INDEX_SUFFIX)).write_text(json.dumps(
        {"format": INDEX_FORMAT, "metadata": {}, "tensors": index}))
    (export / "tables.safetensors").unlink()
    tables = TableFile(export / "tables.safetensors")
    assert all(torch.equal(tables.tensor(k), v) for k, v in whole.items())


@pytest.mark.parametrize("tables", ["one file", "sharded"])
def test_the_model_cards_scoring_code_reproduces_stage_eval(runs: dict[str, Path], ml100k_out: Path,
                                                            valid_eval: dict, tmp_path: Path, tables: str) -> None:
    """The card's "Scoring with this folder alone" snippet, run as printed from inside the folder, with the tables
    in one file or sharded (collab.export: sharded, or auto above 2 GiB)."""
    import shutil

    export = runs["two"] / "sella" / "export"
    if tables == "sharded":
        export = shutil.copytree(export, tmp_path / "export", symlinks=True)
        shard_export_tables(export)
    code = (export / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    scores = pd.read_parquet(runs["two"] / "eval" / "scores-valid.parquet")  # written by valid_eval
    samples = read_samples(ml100k_out, scores.row_id.tolist())
    namespace: dict = {}
    here = Path.cwd()
    os.chdir(export)
    try:
        exec(compile(code, str(export / "README.md"), "exec"), namespace)  # noqa: S102 (the card's code is the test)
    finally:
        os.chdir(here)
    p_yes = namespace["p_yes"]
    mine = [p_yes(samples[r]["user_id"], samples[r]["item_id"], samples[r]["history_titles"], samples[r]["title"])
            for r in scores.row_id]
    assert len(mine) == 24 and max(abs(m - s) for m, s in zip(mine, scores.score, strict=True)) < 1e-5


def test_resuming_with_settings_that_change_the_model_stops_and_names_them(runs: dict[str, Path]) -> None:
    cfg = runs["two"].parent / "two.yaml"
    proc = launch(cfg, "sella", 2, "--set", "sella.lr=0.5", "--set", "llm.history_titles=5")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "sella.lr: 0.03 -> 0.5" in out and "llm.history_titles: 3 -> 5" in out and "--allow-config-change" in out
    recorded = runs["two"] / "sella"
    provenance = json.loads((recorded / "provenance.json").read_text())
    assert provenance["versions"]["torch"] and provenance["versions"]["deepspeed"] and provenance["code"]["commit"]
    kept = yaml.safe_load((recorded / "config.yaml").read_text())  # the refused run left the recorded config
    assert kept["sella"]["lr"] == SELLA["lr"] and kept["llm"]["history_titles"] == 3


def test_collm_like_run_has_no_warm_token_and_keeps_plain_tables(runs: dict[str, Path]) -> None:
    tables, projector = load_file(runs["collm"] / SELLA_TABLES), load_file(runs["collm"] / SELLA_PROJECTOR)
    assert set(tables) == {"user", "item"} and "b.weight" not in projector
    summary = json.loads((runs["collm"] / summary_file("sella")).read_text())
    assert summary["warm_token"] is False and summary["projector_init"] == "random"


def test_checkpoints_and_tensorboard(runs: dict[str, Path]) -> None:
    run = runs["two"]
    latest = json.loads((run / "sella" / "ckpt" / "latest.json").read_text())
    assert latest["step"] == 4 and latest["best_step"] == json.loads((run / summary_file("sella")).read_text())["best_step"] > 0
    assert (run / "sella" / "ckpt" / latest["tag"] / "tables" / ".metadata").is_file()
    assert (run / "sella" / "ckpt" / BEST_TABLES / "dense.pt").is_file()
    events = EventAccumulator(str(run / "tb" / "sella")).Reload()
    assert {"train/loss", "train/lr", "valid/overall/auc"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("valid/overall/auc")] == [0, 2, 4]
    assert {"inject/norm/<User_ID>", "inject/norm/<Item_ID>", "inject/norm/<Warm_ID>",
            "inject/norm/token_embedding_rms"} <= set(events.Tags()["scalars"])
    summary = json.loads((run / summary_file("sella")).read_text())
    assert [p["prompts"] for p in summary["curve"]] == [0, 16, 32]  # steps 0, 2, 4 x 8 prompts (2 x 2 x 2 ranks)
    assert summary["train_prompts"] == 32


def test_a_larger_budget_resumes_from_the_last_checkpoint(runs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    run = shutil.copytree(runs["two"], tmp_path / "two")  # a copy: the other tests read the 4-step run
    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump(yaml.safe_load((runs["two"].parent / "two.yaml").read_text()) | {"run_dir": str(run)}))
    stale = run / "sella" / "ckpt" / "step00000099"  # what a save that crashed before latest.json leaves
    shutil.copytree(run / "sella" / "ckpt" / "step00000004", stale)
    finish(launch(cfg, "sella", 2, "--set", "sella.max_steps=6"))
    summary = json.loads((run / summary_file("sella")).read_text())
    latest = json.loads((run / "sella" / "ckpt" / "latest.json").read_text())
    assert summary["resumed_from"] == 4 and summary["steps"] == 6
    assert latest["tag"] == "step00000006" and latest["step"] == 6
    assert sorted(p.name for p in (run / "sella" / "ckpt").glob("step*") if p.is_dir()) == ["step00000004", "step00000006"]
    events = EventAccumulator(str(run / "tb" / "sella")).Reload()
    assert [e.step for e in events.Scalars("valid/overall/auc")] == [0, 2, 4, 6]
    # its time budget spent, the run stops where it is, however often it is launched again, and rewrites nothing
    files = [run / summary_file("sella"), run / SELLA_PROJECTOR, run / "sella" / "export" / "README.md"]
    before = [(f.read_bytes(), f.stat().st_mtime_ns) for f in files]
    out = finish(launch(cfg, "sella", 2, "--set", "sella.max_steps=8", "--set", "sella.max_minutes=0.0001"))
    assert "this run already finished with these settings; nothing is trained or rewritten" in out
    assert [(f.read_bytes(), f.stat().st_mtime_ns) for f in files] == before
    assert json.loads((run / "sella" / "ckpt" / "latest.json").read_text())["tag"] == "step00000006"


@pytest.mark.parametrize("tables", ["plain MF", "another prep output's", "semantic only"])
def test_stage_2b_tables_that_do_not_fit_are_a_clear_error(runs: dict[str, Path], ml100k_out: Path, tmp_path: Path,
                                                           tables: str) -> None:
    """Plain MF tables have no semantic table for <Warm_ID>; tables one user short would send that user's lookups
    to row 0 without a word from FBGEMM; a file without the user and item tables (stage 2a's vectors) is named."""
    from embeddings.tables import save_tensors

    collab = runs["collm" if tables == "plain MF" else "two"] / COLLAB_FILE
    if tables != "plain MF":
        short = load_file(collab)
        kept = short | {"user": short["user"][:-1]} if tables == "another prep output's" else {"semantic": short["semantic"]}
        save_tensors(tmp_path / "short.safetensors", kept, {})
        collab = tmp_path / "short.safetensors"
    cfg = write_config(tmp_path / "bad.yaml", data_dir=str(ml100k_out), run_dir=str(tmp_path / "run"), llm=LLM,
                       collab=COLLAB, sella=SELLA | {"collab_path": str(collab)})
    proc = launch(cfg, "sella", 1)
    out, _ = proc.communicate(timeout=300)
    says = {"plain MF": "no semantic table (stage 2b ran as plain MF)",
            "another prep output's": f"{collab}: tables for user ids up to 942 and item ids up to 1681, but {ml100k_out} "
                                     "has ids up to 943 and 1681",
            "semantic only": f"{collab}: no 'user' and 'item' tables (it holds ['semantic'])"}[tables]
    assert proc.returncode == 2 and says in out


def test_scoring_with_fewer_rows_than_ranks_names_the_keys(runs: dict[str, Path], tmp_path: Path) -> None:
    """One test row on two ranks: a rank with no rows cannot stand in with a real stage-3 row, so eval stops on
    every rank with the keys to change (it crashed on a KeyError in the injection before)."""
    import shutil

    run = tmp_path / "two"
    shutil.copytree(runs["two"], run, ignore=shutil.ignore_patterns("ckpt", "eval"))
    cfg = yaml.safe_load((runs["two"].parent / "two.yaml").read_text()) | {"run_dir": str(run)}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(cfg))
    proc = launch(tmp_path / "two.yaml", "eval", 2, "--set", "eval.rows=1", "--set", "eval.splits=[test]")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "a rank has no rows to score (2 ranks): score at least one row per rank (sella.eval_rows, eval.rows)" in out
    assert not (run / EVAL_METRICS).exists()


def test_the_tables_do_not_step_on_a_step_the_engine_skipped() -> None:
    """bf16's non-finite gradient norm makes DeepSpeed skip its step: the tables' AdamW skips it too, and a
    non-finite table norm alone skips it, rather than clipping every row by a NaN factor."""
    from launcher.recipes.sella_training import step_tables

    def stepped(grad: torch.Tensor, applied: bool) -> tuple[torch.Tensor, float]:
        w = torch.nn.Parameter(torch.ones(5, 4))
        opt = torch.optim.AdamW([w], lr=0.1)
        w.grad = grad
        norm = step_tables(opt, [w], 0.1, 1.0, applied)
        assert w.grad is not None and not w.grad.any()  # zeroed for the next step either way
        return w.detach(), norm

    nan = torch.zeros(5, 4)
    nan[2, 1] = float("nan")
    for grad, applied in ((nan, True), (torch.ones(5, 4), False)):
        w, _ = stepped(grad, applied)
        assert torch.equal(w, torch.ones(5, 4))
    w, norm = stepped(torch.ones(5, 4), True)
    assert norm == pytest.approx(20 ** 0.5) and (w < 1).all()


def test_fused_tables_get_no_step_from_a_non_finite_micro_batch() -> None:
    """The rows' gradient to fused tables is the rank's share (divided by the world size), or zero when any of it
    is NaN or inf: FBGEMM's fused optimizer steps inside backward and cannot skip."""
    from launcher.recipes.sella_training import fused_rows_grad

    grad = torch.arange(8.0).reshape(2, 4)
    assert torch.equal(fused_rows_grad(grad, 2), grad / 2)
    for bad in (float("nan"), float("inf")):
        broken = grad.clone()
        broken[1, 2] = bad
        assert torch.equal(fused_rows_grad(broken, 2), torch.zeros(2, 4))


@pytest.mark.parametrize("table_optimizer", ["adamw", "rowwise_adagrad"])  # replicated tables; FBGEMM's fused ones,
# row_wise sharded, as the GPU config's CoLLM-like row runs them
def test_frozen_tables_stay_as_stage_2b_left_them(ml100k_out: Path, tmp_path: Path, table_optimizer: str) -> None:
    """`sella.train_tables: false` (the CoLLM-like row: CoLLM keeps its MF frozen): two steps on 2 ranks train the
    projector and leave every table row as stage 2b wrote it."""
    cfg = prepare(tmp_path / "run", ml100k_out, tmp_path / "run.yaml", semantic=False, micro_batch=2, max_steps=2,
                  eval_every=0, eval_rows=8, warm_token=False, projector_init="random", loss="answer",
                  train_tables=False, table_optimizer=table_optimizer)
    finish(launch(cfg, "sella", 2))
    run = tmp_path / "run"
    summary = json.loads((run / summary_file("sella")).read_text())
    assert summary["steps"] == 2 and summary["table_optimizer"].startswith("none: train_tables false")
    before = load_file(run / COLLAB_FILE)
    saved = table_weights(read_tables_checkpoint(run / "sella" / "ckpt" / "step00000002"))
    for name in ("user", "item"):
        assert torch.equal(saved[name], before[name]), name
    assert min(logged(run, "train/grad_norm")) > 0  # the projector did learn
    assert "train/table_grad_norm" not in EventAccumulator(str(run / "tb" / "sella")).Reload().Tags()["scalars"]
