"""launcher/train.py's --stage: all, one stage, or a comma list of stages in pipeline order (one launch)."""
from __future__ import annotations

import pytest

from launcher.train import STAGES, parse_args, selected_stages

DATA = {"path": "out/ml-100k", "name": "ml-100k", "created": "2026-12-07T09:00:00+00:00"}  # prep_output()

BASE = ["--config", "configs/ml-100k.yaml", "--stage"]


@pytest.mark.parametrize(("stage", "runs"), [("all", STAGES), ("lora", ("lora",)), ("sella,eval", ("sella", "eval")),
                                            ("distill,collab", ("distill", "collab")),
                                            ("lora,distill,collab,sella,eval", STAGES)])
def test_stage_lists_in_pipeline_order_parse(stage: str, runs: tuple[str, ...]) -> None:
    assert selected_stages(parse_args([*BASE, stage]).stage) == runs
    assert STAGES == ("lora", "distill", "collab", "sella", "eval")


@pytest.mark.parametrize("stage, says", [("eval,sella", "pipeline order"), ("sella,sella", "pipeline order"),
                                         ("all,eval", "expected all or stages"), ("train", "expected all or stages")])
def test_bad_stage_lists_are_named(stage: str, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args([*BASE, stage])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err and repr(stage) in err


def test_a_resume_on_another_world_size_with_the_same_global_micro_batch_is_no_change() -> None:
    """The global micro-batches of stages 1 and 3 are the same on 2 ranks x 2 as on 1 rank x 4 (train_batches,
    global_batches), so under ZeRO 0 (auto on one host) a resume on another world size trains on the same data."""
    from launcher.provenance import changed_keys
    from tests.conftest import config

    two_by_2 = config("ml-100k", sella={"micro_batch": 2}, lora={"micro_batch": 2}).model_dump(mode="json")
    one_by_4 = config("ml-100k", sella={"micro_batch": 4}, lora={"micro_batch": 4}).model_dump(mode="json")
    for stage in ("lora", "sella"):
        assert changed_keys(two_by_2, one_by_4, stage, 2, 1) == []
        assert changed_keys(two_by_2, one_by_4, stage, 2, 2) == [f"{stage}.micro_batch x ranks"]
        assert changed_keys(two_by_2, two_by_2, stage, 2, 1) == [f"{stage}.micro_batch x ranks"]


def test_a_record_made_before_a_key_existed_ran_with_its_implied_value() -> None:
    """A stage-3 record without `sella.train_tables` (made before the key) trained its tables: the default compares
    equal, and freezing them is a change named from what the old run did."""
    from launcher.provenance import _detail, changed_keys, shaping
    from tests.conftest import config

    old = config("collm-ml-1m").model_dump(mode="json")
    del old["sella"]["train_tables"]
    assert changed_keys(old, config("collm-ml-1m").model_dump(mode="json"), "sella") == []
    frozen = config("collm-ml-1m", sella={"train_tables": False}).model_dump(mode="json")
    assert changed_keys(old, frozen, "sella") == ["sella.train_tables"]
    detail = _detail(shaping(old, "sella", 1), shaping(frozen, "sella", 1), ["sella.train_tables"])
    assert detail == "sella.train_tables: True -> False"


def test_under_zero_1_to_3_stage_3_resumes_only_on_its_world_size(tmp_path) -> None:
    """DeepSpeed partitions ZeRO 1-3 optimizer state by rank and refuses to load it on another number of ranks, so
    there the world size is a key of stages 1 and 3, as the ZeRO stage is. A finished stage that
    `--stage all` skips (resumes=False) is not compared on how it ran, only on what shapes it."""
    import json

    import yaml

    from launcher.provenance import PROVENANCE, RUN_CONFIG, ConfigChanged, changed_keys, check
    from tests.conftest import config

    def ran(zero: int, micro_batch: int, **lora) -> dict:
        return config("ml-100k", sella={"micro_batch": micro_batch}, lora=lora,
                      deepspeed={"zero_stage": zero, "precision": "fp32"}).model_dump(mode="json")

    assert changed_keys(ran(3, 2), ran(3, 4), "sella", 2, 1) == ["world"]
    assert changed_keys(ran(0, 2), ran(0, 4), "sella", 2, 1) == []
    for stage in ("lora", "sella"):
        assert changed_keys(ran(0, 2), ran(3, 2), stage, 2, 2) == ["deepspeed.zero_stage", "world"]
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / RUN_CONFIG).write_text(yaml.safe_dump(ran(0, 2)))  # stage 1 ran on 2 CPU ranks
    data = DATA
    (tmp_path / "lora" / PROVENANCE).write_text(json.dumps({"world": 2, "data": data}))
    on_8_gpus = config("ml-100k", sella={"micro_batch": 2}, deepspeed={"zero_stage": 3, "precision": "bf16"})
    with pytest.raises(ConfigChanged, match=r"deepspeed\.zero_stage: 0 -> 3.*world: 2 -> 8"):
        check(on_8_gpus, tmp_path, "lora", 8, allow_change=False, data=data)
    assert check(on_8_gpus, tmp_path, "lora", 8, allow_change=False, data=data, resumes=False) == []
    other_rank = on_8_gpus.model_copy(update={"lora": on_8_gpus.lora.model_copy(update={"r": 4})})
    with pytest.raises(ConfigChanged, match=r"lora\.r: 64 -> 4"):
        check(other_rank, tmp_path, "lora", 8, allow_change=False, data=data, resumes=False)
    micro = on_8_gpus.lora.micro_batch  # the config's micro-batch changed (not the ranks): named per rank
    bigger = on_8_gpus.model_copy(update={"lora": on_8_gpus.lora.model_copy(update={"micro_batch": micro * 2})})
    with pytest.raises(ConfigChanged, match=rf"\(lora\.micro_batch: {micro} -> {micro * 2}\)"):
        check(bigger, tmp_path, "lora", 8, allow_change=False, data=data, resumes=False)
    copied = {**data, "path": "/mnt/elsewhere/ml-100k"}  # the same prep output in another folder
    assert check(on_8_gpus, tmp_path, "lora", 8, allow_change=False, data=copied, resumes=False) == []
    named = on_8_gpus.model_copy(update={"data_dir": "/mnt/elsewhere/ml-100k"})  # named by data_dir, not --data
    assert check(named, tmp_path, "lora", 8, allow_change=False, data=copied, resumes=False) == []
    again = {**data, "created": "2026-12-08T09:00:00+00:00"}  # prep ran again: what the stage made is of other data
    for allow in (False, True):  # --allow-config-change cannot make other data fit
        with pytest.raises(ConfigChanged, match=r"data \(the prep output\): \{'path': 'out/ml-100k'.*2026-12-08") as err:
            check(on_8_gpus, tmp_path, "lora", 8, allow_change=allow, data=again, resumes=False)
        assert str(err.value).endswith("use another --run-dir")


def test_the_valid_rows_a_stage_selects_on_shape_it() -> None:
    """Stages 1 and 3 keep the state that scores best on their valid rows: a resume on other rows would compare
    AUCs of two subsets. Budget keys such as eval_every may change."""
    from launcher.provenance import changed_keys
    from tests.conftest import config

    a = config("ml-100k", sella={"eval_rows": 24}, lora={"eval_rows": 24}).model_dump(mode="json")
    b = config("ml-100k", sella={"eval_rows": 48}, lora={"eval_rows": 48}).model_dump(mode="json")
    assert changed_keys(a, b, "sella") == ["sella.eval_rows"] and changed_keys(a, b, "lora") == ["lora.eval_rows"]
    c = config("ml-100k", sella={"eval_rows": 24, "eval_every": 7}, lora={"eval_rows": 24, "eval_every": 7})
    assert changed_keys(a, c.model_dump(mode="json"), "sella") == changed_keys(a, c.model_dump(mode="json"), "lora") == []


@pytest.mark.parametrize("gpu", [False, True])
def test_auto_settings_are_recorded_as_they_ran(gpu: bool) -> None:
    """`auto` precision and backend are made concrete, so a bf16 GPU run resumed in fp32 on CPU is a changed key."""
    import torch

    from launcher.dist import Dist
    from launcher.engine import resolve
    from launcher.provenance import changed_keys
    from tests.conftest import config

    def ran(gpu: bool) -> dict:
        ctx = Dist(0, 1, 1, torch.device("cpu"), torch.bfloat16 if gpu else torch.float32, "nccl" if gpu else "gloo")
        return resolve(config("ml-100k"), ctx).model_dump(mode="json")

    ds = ran(gpu)["deepspeed"]
    assert (ds["zero_stage"], ds["precision"], ds["backend"]) == ((0, "bf16", "nccl") if gpu else (0, "fp32", "gloo"))
    assert changed_keys(ran(gpu), ran(not gpu), "sella") == ["deepspeed.precision"]
    legacy = config("ml-100k").model_dump(mode="json")  # recorded before precision was resolved: `auto`
    assert legacy["deepspeed"]["precision"] == "auto" and changed_keys(legacy, ran(gpu), "sella") == []


def test_column_wise_row_wise_adagrad_tables_do_not_resume_under_another_sharding() -> None:
    """TorchRec cuts column_wise tables into 128-column blocks, each with its own row-wise Adagrad state: a resume to
    or from column_wise is a changed key, the other shardings (and other table optimizers) reshard freely."""
    from launcher.provenance import COLUMN_BLOCKS, changed_keys
    from tests.conftest import config

    def ran(sharding: str, optimizer: str = "rowwise_adagrad") -> dict:
        return config("ml-100k", collab={"sharding": sharding, "table_optimizer": optimizer},
                      sella={"table_optimizer": optimizer}).model_dump(mode="json")

    for stage in ("collab", "sella"):
        assert changed_keys(ran("table_wise"), ran("column_wise"), stage) == [COLUMN_BLOCKS]
        assert changed_keys(ran("column_wise"), ran("row_wise"), stage) == [COLUMN_BLOCKS]
        assert changed_keys(ran("table_wise"), ran("row_wise"), stage) == []
        assert changed_keys(ran("column_wise"), ran("column_wise"), stage) == []
        assert COLUMN_BLOCKS not in changed_keys(ran("table_wise", "sgd"), ran("column_wise", "sgd"), stage)


@pytest.mark.parametrize(("offload", "zero", "says"), [
    ({"offload_param": "cpu"}, "auto", "deepspeed.offload_param: cpu needs ZeRO stage 3 or more, and this run is ZeRO-0"),
    ({"offload_param": "cpu"}, 2, "deepspeed.offload_param: cpu needs ZeRO stage 3"),
    ({"offload_optimizer": "cpu"}, 0, "deepspeed.offload_optimizer: cpu needs ZeRO stage 1 or more"),
])
def test_an_offload_its_zero_stage_ignores_is_refused(offload: dict, zero: int | str, says: str) -> None:
    """DeepSpeed accepts both offloads under any stage and ignores them where they do not apply."""
    import torch

    from launcher.dist import Dist
    from launcher.engine import resolve
    from tests.conftest import config

    cfg = config("ml-100k", deepspeed={"zero_stage": zero, **offload})
    with pytest.raises(ValueError, match="needs ZeRO stage") as err:
        resolve(cfg, Dist(0, 1, 1, torch.device("cpu"), torch.float32, "gloo"))
    assert says in str(err.value)
    fits = resolve(config("ml-100k", deepspeed={"zero_stage": 3, **offload}), Dist(0, 1, 1, torch.device("cpu"),
                                                                                  torch.float32, "gloo"))
    (key, device), = offload.items()
    assert fits.deepspeed.zero_stage == 3 and getattr(fits.deepspeed, key) == device


@pytest.mark.parametrize("model", ["sella", "lora", "popularity"])
def test_eval_scores_with_the_prompt_settings_the_scored_model_trained_with(tmp_path, model: str) -> None:
    """Stage eval checks `llm` and `domain` against the config the trained stage recorded (stage 1's may be the
    upstream run's); popularity reads no LLM."""
    import yaml

    from launcher.provenance import RUN_CONFIG, ConfigChanged, check
    from tests.conftest import config

    upstream, run = tmp_path / "upstream", tmp_path / "run"
    where = (upstream if model == "lora" else run) / {"sella": "sella", "lora": "lora"}.get(model, "sella")
    where.mkdir(parents=True)
    (where / RUN_CONFIG).write_text(yaml.safe_dump(config("ml-100k").model_dump(mode="json")))
    same = config("ml-100k", upstream=str(upstream), eval={"model": model})
    assert check(same, run, "eval", 2, False, DATA) == []
    other = config("ml-100k", upstream=str(upstream), eval={"model": model}, llm={"history_titles": 7})
    if model == "popularity":
        assert check(other, run, "eval", 2, False, DATA) == []
        return
    with pytest.raises(ConfigChanged, match=rf"eval.model {model} scores a model stage {model} trained with other "
                                            r"prompt or model settings \(llm.history_titles: \d+ -> 7\)"):
        check(other, run, "eval", 2, False, DATA)
    assert check(other, run, "eval", 2, True, DATA) == ["llm.history_titles"]


def test_a_larger_budget_replans_the_cosine_from_the_restored_step() -> None:
    """A finished 128-step run (cosine to 0) resumed with 256 steps trains its step 129 at the 256-step plan's lr, not
    at the restored 0, and goes on as a run planned for 256 steps; a resume with the same budget keeps its lr, one
    with another peak lr follows the same schedule at that peak."""
    import torch

    from launcher.config import Config
    from launcher.engine import cosine_schedule, replan_lr
    from pipeline.config import load_config

    lora = load_config("configs/ml-100k.yaml", ["lora.warmup_steps=5", "lora.min_lr_ratio=0"], schema=Config).lora

    def stepped(total: int, steps: int, restored: tuple[dict, dict] | None = None):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        schedule = cosine_schedule(lora, total)(opt)
        if restored:
            opt.load_state_dict(restored[0])
            schedule.load_state_dict(restored[1])
        for _ in range(steps):
            opt.step()
            schedule.step()
        return opt, schedule

    opt, schedule = stepped(128, 128)
    saved = (opt.state_dict(), schedule.state_dict())
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)
    planned = [stepped(256, n)[0].param_groups[0]["lr"] for n in (128, 129)]
    opt, schedule = stepped(256, 0, saved)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)  # what the checkpoint restores
    replan_lr(schedule, 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(planned[0]) and schedule.get_last_lr() == [opt.param_groups[0]["lr"]]
    assert planned[0] > 0.2
    opt.step()
    schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(planned[1])
    whole, schedule = stepped(128, 64)  # a resume mid-run with its own budget: the lr it had
    mid = (whole.state_dict(), schedule.state_dict())
    opt, schedule = stepped(128, 0, mid)
    replan_lr(schedule, 0.5)
    assert opt.param_groups[0]["lr"] == whole.param_groups[0]["lr"] > 0.2
    opt, schedule = stepped(128, 0, mid)  # resumed with half the peak lr (--allow-config-change): half the lr on
    replan_lr(schedule, 0.25)
    assert opt.param_groups[0]["lr"] == pytest.approx(whole.param_groups[0]["lr"] / 2)
    opt.step()
    schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(stepped(128, 65)[0].param_groups[0]["lr"] / 2)


def test_an_epochs_budget_plans_whole_steps_exactly() -> None:
    """1.1 epochs of 6,400 rows at 64 prompts per step are 110 steps (110.00000000000001 in floats, which ceil made
    111); an epoch is the global micro-batches (8 rows here) its rows fill, as the streams cut it (6,407 rows: 800,
    the last 7 rows are left out); a fraction of a step still rounds up, and the first budget to run out decides."""
    from launcher.config import Config
    from launcher.engine import planned_steps
    from pipeline.config import load_config

    def steps(*overrides: str, rows: int = 6400) -> int:
        lora = load_config("configs/ml-100k.yaml", ["lora.micro_batch=4", "lora.grad_accum=8", "lora.max_steps=null",
                                                     *overrides], schema=Config).lora
        return planned_steps(lora, rows, world=2)

    assert steps("lora.epochs=1.1") == 110
    assert steps("lora.epochs=1") == 100 and steps("lora.epochs=1", rows=6407) == 100
    assert steps("lora.epochs=1", rows=6408) == 101  # 801 global micro-batches: the last step starts the next epoch
    assert steps("lora.epochs=0.3") == 30 and steps("lora.epochs=3") == 300
    assert steps("lora.epochs=1", "lora.max_samples=1000") == 16 and steps("lora.epochs=1", "lora.max_steps=7") == 7


def test_a_missing_upstream_or_data_of_another_domain_stops_before_any_stage(tmp_path, capsys) -> None:
    """Both are found before the process group starts (exit 2, the key named): a mistyped `upstream` made `--stage
    all` train stages 1-2b in the row's own directory, silently; a config's domain picks the prompts' words."""
    import json

    from launcher.train import main
    from pipeline.schema import MANIFEST, SCHEMA_VERSION

    data = tmp_path / "data"
    data.mkdir()
    manifest = {"schema_version": SCHEMA_VERSION, "domain": "movie", "config": {"protocol": {"history_len": 10}}}
    (data / MANIFEST).write_text(json.dumps(manifest))
    args = ["--config", "configs/ml-100k.yaml", "--stage", "all", "--data", str(data), "--run-dir", str(tmp_path / "r")]
    assert main([*args, "--set", f"upstream={tmp_path / 'nope'}"]) == 2
    assert f"upstream: {tmp_path / 'nope'} is not a directory" in capsys.readouterr().err
    assert main([*args, "--set", "domain=book"]) == 2
    assert f"{data}: its manifest says domain 'movie', the config says 'book'" in capsys.readouterr().err
    assert main([*args[:-4], "--data", str(tmp_path / "none"), *args[-2:]]) == 2  # no prep output: its command
    assert (f"{tmp_path / 'none' / MANIFEST}: no prep output there; make it first: spark-submit pipeline/prep.py "
            f"--config configs/ml-100k.yaml --output {tmp_path / 'none'}") in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_stage_taken_from_upstream_must_have_run_on_this_prep_output(tmp_path) -> None:
    """`--stage all` skips the upstream's finished stage 1 and reads its adapter: an adapter trained on another prep
    output (another --data, or prep run again) is refused, naming both, whatever --allow-config-change says."""
    import json

    import yaml

    from launcher import provenance
    from tests.conftest import config

    cfg = config("collm-ml-1m")
    upstream = tmp_path / "up"
    (upstream / "lora").mkdir(parents=True)
    (upstream / "lora" / provenance.RUN_CONFIG).write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    (upstream / "lora" / provenance.PROVENANCE).write_text(json.dumps({"world": 2, "data": DATA}))
    assert provenance.check_upstream(cfg, upstream, "lora", False, DATA) == []
    # how it ran there is not what it made: stage 1 under ZeRO-3 in bf16 across two nodes serves a row on one CPU host
    across = cfg.model_copy(update={"deepspeed": cfg.deepspeed.model_copy(update={"zero_stage": 3, "precision": "bf16"})})
    (upstream / "lora" / provenance.RUN_CONFIG).write_text(yaml.safe_dump(across.model_dump(mode="json")))
    resolved = cfg.model_copy(update={"deepspeed": cfg.deepspeed.model_copy(update={"zero_stage": 0, "precision": "fp32"})})
    assert provenance.check_upstream(resolved, upstream, "lora", False, DATA) == []
    r4 = resolved.model_copy(update={"lora": resolved.lora.model_copy(update={"r": 4})})
    with pytest.raises(provenance.ConfigChanged, match=r"other settings \(lora\.r: 64 -> 4\)"):
        provenance.check_upstream(r4, upstream, "lora", False, DATA)
    other = DATA | {"path": "out/other", "created": "2026-12-07T10:00:00+00:00"}
    for allow in (False, True):
        with pytest.raises(provenance.ConfigChanged, match=r"which ran it on another prep output \(out/ml-100k, "
                                                           r"ml-100k, made 2026-12-07T09:00.*than this launch's "
                                                           r"\(out/other, ml-100k, made 2026-12-07T10:00"):
            provenance.check_upstream(cfg, upstream, "lora", allow, other)
    tables = tmp_path / "mf" / "collab" / "collab.safetensors"  # the CoLLM-like row's MF tables (sella.collab_path)
    tables.parent.mkdir(parents=True)
    provenance.check_tables_trained_on(tables, other)  # no record beside them: nothing to compare
    (tables.parent / provenance.PROVENANCE).write_text(json.dumps({"world": 2, "data": DATA}))
    provenance.check_tables_trained_on(tables, DATA | {"path": "/mnt/copy"})  # the same output in another folder
    with pytest.raises(provenance.ConfigChanged, match=r"collab\.safetensors: sella\.collab_path names tables trained "
                                                       r"on another prep output \(out/ml-100k"):
        provenance.check_tables_trained_on(tables, other)


def test_the_stages_a_launch_takes_from_upstream_are_those_it_reads_and_does_not_run(tmp_path) -> None:
    """Which upstream stages a launch checks (provenance.check_upstream): `--stage sella` alone reads stages 1 and 2b
    (and 2a through them) when this run has not made them, and only stage 1 with its own tables (`sella.collab_path`,
    the CoLLM-like row); a stage it runs itself, or made here, is not taken;
    eval alone takes none (check_scored compares the model it scores); no upstream, none."""
    from launcher.artifacts import DONE
    from launcher.train import taken_from_upstream
    from tests.conftest import config

    upstream, run_dir = tmp_path / "up", tmp_path / "run"
    for stage in ("lora", "distill", "collab"):
        (upstream / DONE[stage]).parent.mkdir(parents=True, exist_ok=True)
        (upstream / DONE[stage]).write_text("{}")
    cfg = config("ml-100k", upstream=str(upstream))

    def taken(stages: tuple[str, ...]) -> list[str]:
        return taken_from_upstream(cfg, run_dir, tmp_path / "data", stages, everything=False)

    assert taken(("sella",)) == taken(("sella", "eval")) == ["lora", "distill", "collab"]
    assert taken(("collab", "sella")) == ["lora", "distill"] and taken(("distill",)) == ["lora"]
    assert taken(("lora",)) == taken(("eval",)) == []
    (run_dir / DONE["distill"]).parent.mkdir(parents=True)
    (run_dir / DONE["distill"]).write_text("{}")  # this run's own stage 2a
    assert taken(("sella",)) == ["lora", "collab"]
    assert taken_from_upstream(config("ml-100k"), run_dir, tmp_path / "data", ("sella",), everything=False) == []
    mf_tables = config("ml-100k", upstream=str(upstream), sella={"collab_path": "runs/mf/collab/collab.safetensors"})
    assert taken_from_upstream(mf_tables, tmp_path / "row", tmp_path / "data", ("sella",), everything=False) == ["lora"]


def _decide(rank: int, port: int, folder: str) -> None:
    """One of 2 ranks deciding from what it sees of the run directory: alike, then not (rank 1 sees no finished stage);
    then a recipe's resume point, from a checkpoint folder only rank 0 sees a latest.json in (each rank its own
    folder, as nodes without a shared filesystem)."""
    import json
    import os
    from pathlib import Path

    import torch.distributed as dist

    from launcher import checkpoint
    from launcher.dist import disagreement

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    alike = disagreement(("runs/x/collab/collab.safetensors", True), "[sella] (newer input, finished)")
    unlike = disagreement((None, rank == 0), "[lora] (newer input, finished)")
    ckpt = Path(folder, f"ckpt{rank}")
    ckpt.mkdir()
    if rank == 0:
        (ckpt / checkpoint.LATEST).write_text(json.dumps({"tag": "step00000004", "step": 4}))
    try:
        checkpoint.load(None, ckpt)  # refused before it touches an engine
        resume = "loaded"
    except ValueError as err:
        resume = str(err)
    Path(folder, f"rank{rank}.json").write_text(json.dumps([alike, unlike, resume]))
    dist.destroy_process_group()


@pytest.mark.integration  # starts 2 processes
def test_ranks_that_see_the_run_directory_differently_all_stop_with_the_difference(tmp_path) -> None:
    """Each rank decides from the files it sees whether a stage is finished or stale: nodes that see the run directory
    differently (no shared filesystem, a stale NFS cache) would run different stages and wait in each other's
    collectives. Every rank gets the same error, naming what differs, and stops. So do the recipes' resume points."""
    import json

    import torch.multiprocessing as mp

    from tests.launch import free_port

    mp.spawn(_decide, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0][:2] == results[1][:2] and results[0][0] is None
    assert results[0][1].startswith("[lora] (newer input, finished): rank 1 sees (None, False), rank 0 sees (None, True); "
                                    "every node must see the run directory and the prep output on one shared filesystem")
    assert [r[2] for r in results] == [f"{tmp_path / f'ckpt{r}' / 'latest.json'} (the checkpoint to resume from): rank 1 "
                                       "sees None, rank 0 sees 'step00000004'; every node must see the run directory and "
                                       "the prep output on one shared filesystem, as written (README, multi-node)"
                                       for r in range(2)]
