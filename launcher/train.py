"""SeLLa-Rec training entry point: one script for every stage and every launcher.

    deepspeed --hostfile HOSTFILE --no_ssh_check --master_addr 127.0.0.1 \\
        launcher/train.py --config configs/ml-1m.yaml --stage lora
    deepspeed --num_gpus 8 launcher/train.py --config configs/ml-1m.yaml --stage lora
    torchrun --nproc_per_node 2 launcher/train.py --config configs/ml-1m.yaml --stage lora

Stages (docs/method.md): lora (stage 1, LoRA tuning on text-only prompts), distill (stage 2a,
semantic item vectors from the tuned LLM), collab (stage 2b, the TorchRec-sharded Collab model aligned to
them; `--set collab.align.weight=0` gives plain MF), sella (stage 3, the LLM reading the projected collab
and semantic vectors at <User_ID>, <Item_ID>, <Warm_ID>; the tables stay TorchRec-sharded), eval (Yes/No
scores of valid and test: per-row Parquet, metrics JSON, ROC/PR curves; eval.model picks sella, lora,
mf or popularity), all (every stage in that order, skipping those whose finished artifacts exist, stopping at
one older than an earlier stage's, then a results table). A comma list such as `--stage sella,eval` runs those
stages in one launch, in that order. Each stage reads the prep output (--data, else the config's `data_dir`, else
out/<config name>) and writes under the run directory (--run-dir, else the config's `run_dir`, else runs/<config
name>); a killed run resumes from its latest checkpoint when started again, and a finished one launched again with
nothing left to train rewrites nothing. A stage whose run is older than an earlier stage's artifact stops the launch
(exit 2) with the command that runs it again. Exit status 2 on a bad config or missing input.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

if __package__ in (None, ""):  # run as a script by a launcher: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher import provenance
from launcher.artifacts import (
    DONE,
    EVAL_METRICS,
    SEMANTIC_FILE,
    SHARED_BY_UPSTREAM,
    done,
    finished,
    made_so_far,
    newer_input,
    tensorboard_dir,
)
from launcher.config import Config
from launcher.metrics import results_table
from pipeline.config import ConfigError, data_path, load_config, run_path
from pipeline.schema import MANIFEST, load_manifest

STAGES = ("lora", "distill", "collab", "sella", "eval")
RECIPES = {"lora": "lora_tuning", "distill": "distillation", "collab": "collab_alignment", "sella": "sella_training",
           "eval": "evaluation"}  # stage -> module of launcher/recipes/


def stage_list(arg: str) -> str:
    """`all`, one stage, or a comma list of stages in pipeline order (one launch, one model load per stage)."""
    names = arg.split(",")
    unknown = [n for n in names if n not in (*STAGES, "all")]
    if unknown or ("all" in names and len(names) > 1):
        raise argparse.ArgumentTypeError(f"{arg!r}: expected all or stages among {', '.join(STAGES)}")
    if "all" not in names and [STAGES.index(n) for n in names] != sorted({STAGES.index(n) for n in names}):
        raise argparse.ArgumentTypeError(f"{arg!r}: list each stage once, in pipeline order ({', '.join(STAGES)})")
    return arg


def selected_stages(arg: str) -> tuple[str, ...]:
    """The stages a `--stage` value (already checked by stage_list) runs, in pipeline order."""
    return STAGES if arg == "all" else tuple(arg.split(","))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launcher/train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/ml-1m.yaml")
    p.add_argument("--stage", required=True, type=stage_list, metavar="STAGE[,STAGE...]|all",
                   help=f"stage to run ({', '.join(STAGES)}), a comma list of them in that order, or all")
    p.add_argument("--data", help="prep output directory (default: data_dir of the config, else out/<name>)")
    p.add_argument("--run-dir", help="artifacts directory (default: run_dir of the config, else runs/<name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set collab.align.weight=0 (YAML value; repeatable)")
    p.add_argument("--fresh", action="store_true",
                   help="delete the stage's checkpoints, outputs and TensorBoard events first (with all: of every "
                        "stage); artifacts of an upstream run are never touched")
    p.add_argument("--allow-config-change", action="store_true",
                   help="continue a stage whose earlier run (checkpoints or finished artifacts) used settings that change "
                        "its model; without it such a run stops and names the keys")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    return p.parse_args(argv)


def load_recipes(stages: tuple[str, ...]) -> dict[str, ModuleType]:
    """Import every stage's recipe before any stage runs.

    A model loaded under DeepSpeed's ZeRO-3 zero.Init leaves nn.Module subclassing patched, and TorchRec
    imported after that fails (`ShardedModule has no attribute __parameters__`), so --stage all must
    import the collab and sella recipes before the lora stage loads the LLM. They are imported before the
    process group exists too: TorchRec imported after init_process_group keeps the gloo group alive past
    destroy_process_group, and its threads can then abort the interpreter at exit.
    """
    return {stage: importlib.import_module(f"launcher.recipes.{RECIPES[stage]}") for stage in stages}


def check_prep(cfg: Config, data_dir: Path, manifest: dict) -> None:
    """The prep output fits the config: it is of the config's domain (the prompts' words) and its samples hold the
    history titles the prompts show."""
    if manifest.get("domain", cfg.domain) != cfg.domain:
        raise ValueError(f"{data_dir}: its manifest says domain {manifest['domain']!r}, the config says {cfg.domain!r} "
                         "(the prompts' words); set domain to the data's or pass the --data of that domain")
    kept = manifest["config"]["protocol"]["history_len"]
    if cfg.llm.history_titles > kept:
        raise ValueError(f"{data_dir}: its samples hold the last {kept} history titles (protocol.history_len), fewer "
                         f"than llm.history_titles {cfg.llm.history_titles}; lower llm.history_titles or run prep with "
                         "a larger protocol.history_len")


def taken_from_upstream(cfg: Config, run_dir: Path, data_dir: Path, stages: tuple[str, ...], everything: bool) -> list[str]:
    """The shared stages (lora, distill, collab) whose finished artifacts this launch reads from its upstream run
    instead of running them: with `--stage all` (`everything`), those finished there that it skips; with a list of
    stages, those finished there that come before a training stage of the list and are not in it (`--stage sella`
    reads stage 1's adapter and stage 2b's tables, and 2a's vectors through them; with `sella.collab_path` set it
    reads neither 2a nor 2b of the upstream: the CoLLM-like row's MF tables). Not for stage eval alone: it reads only
    the model it scores, which provenance.check_scored compares, and may score it on another prep output (a shuffled
    copy)."""
    if not cfg.upstream:
        return []
    upstream_only = [s for s in SHARED_BY_UPSTREAM if not (run_dir / DONE[s]).exists()]
    if everything:
        return [s for s in upstream_only if done(cfg, run_dir, data_dir, s)]
    trained = [STAGES.index(s) for s in stages if s != "eval"]
    own_tables = bool(cfg.sella.collab_path) and max(trained, default=-1) == STAGES.index("sella") and \
        "collab" not in stages
    return [s for s in upstream_only if trained and STAGES.index(s) < max(trained) and s not in stages
            and not (own_tables and s in ("distill", "collab")) and finished(cfg, run_dir, s) is not None]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set, schema=Config)
        data_dir = data_path(cfg, args.data)
        if not (data_dir / MANIFEST).is_file():
            raise FileNotFoundError(f"{data_dir / MANIFEST}: no prep output there; make it first: spark-submit "
                                    f"pipeline/prep.py --config {args.config} --output {data_dir}")
        manifest = load_manifest(data_dir)
        check_prep(cfg, data_dir, manifest)
        if cfg.upstream and not Path(cfg.upstream).is_dir():  # else --stage all would train its stages here, silently
            raise FileNotFoundError(f"upstream: {cfg.upstream} is not a directory; run the config whose run directory "
                                    "it is first, or set upstream: null to run every stage in this run")
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_dir = run_path(cfg, args.run_dir)
    data = provenance.prep_output(data_dir, manifest)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message="Please use DTensor instead")  # TorchRec's ShardedTensor state
    from launcher.dist import disagreement, setup
    from launcher.engine import resolve

    stages = selected_stages(args.stage)
    recipes = load_recipes(stages)
    dist_ctx = setup(cfg.deepspeed)
    import torch.distributed as dist

    def refuse(message: str) -> int:
        """Every rank stops (they all reach it: what it refuses is agreed); rank 0 says why."""
        if dist_ctx.main:
            print(f"error: {message}", file=sys.stderr)
        dist.destroy_process_group()
        return 2

    try:
        cfg = resolve(cfg, dist_ctx)
    except ValueError as err:  # a setting this machine's resolved ZeRO stage cannot take
        return refuse(str(err))
    if args.fresh and dist_ctx.main:
        for stage in stages:
            shutil.rmtree(run_dir / stage, ignore_errors=True)
            shutil.rmtree(run_dir / tensorboard_dir(stage), ignore_errors=True)
            if stage == "distill":
                (run_dir / SEMANTIC_FILE).unlink(missing_ok=True)
    dist.barrier()
    refused = None
    try:
        changes = {stage: provenance.check(cfg, run_dir, stage, dist_ctx.world, args.allow_config_change, data,
                                           resumes=args.stage != "all" or not done(cfg, run_dir, data_dir, stage))
                   for stage in stages}
        for stage in taken_from_upstream(cfg, run_dir, data_dir, stages, args.stage == "all"):
            provenance.check_upstream(cfg, Path(cfg.upstream), stage, args.allow_config_change, data)
        if "sella" in stages and cfg.sella.collab_path:
            provenance.check_tables_trained_on(Path(cfg.sella.collab_path), data)
    except provenance.ConfigChanged as err:
        refused = str(err)
    # (a collective too: every rank has read the earlier run's records before rank 0 writes this run's)
    differ = disagreement(refused, "the earlier runs' records")
    if differ or refused:
        return refuse(differ or refused)
    for stage in stages:
        newer = newer_input(cfg, run_dir, data_dir, stage) if stage != "eval" else None  # (eval keeps nothing: it rescores)
        skip = args.stage == "all" and done(cfg, run_dir, data_dir, stage)
        differ = disagreement((str(newer) if newer else None, skip), f"[{stage}] (newer input, finished)")
        if differ:
            return refuse(differ)
        if newer is not None:
            stale = made_so_far(cfg, run_dir, stage)
            if stale is not None and not stale.is_relative_to(run_dir):  # --fresh here would not touch it
                shared = ",".join(s for s in STAGES[STAGES.index(stage):] if s in SHARED_BY_UPSTREAM)
                recorded = Path(cfg.upstream) / stage / provenance.RUN_CONFIG
                again = (f"It is the upstream run's ({cfg.upstream}), which --fresh here does not touch: run it there "
                         f"again with the config it ran with, launcher/train.py --config {recorded} --run-dir "
                         f"{cfg.upstream} --data {data_dir} --stage {shared} --fresh, then this run's stages; or set "
                         "upstream: null to run every stage in this run")
            else:
                again = f"Run it again from scratch: --stage {','.join(STAGES[STAGES.index(stage):])} --fresh"
            return refuse(f"[{args.stage}] {stale} is older than {newer}: prep or an earlier stage ran again after "
                          f"{stage} finished or checkpointed, and launching {stage} would keep what it made from the old "
                          f"inputs. {again}")
        if skip:
            if dist_ctx.main:
                print(f"[all] {stage}: finished artifacts found ({DONE[stage]}), skipped", flush=True)
            continue
        made = run_dir / DONE[stage]
        stamp = made.stat().st_mtime_ns if made.exists() else None
        files = provenance.made_files(run_dir, stage) if dist_ctx.main else {}
        earlier = provenance.record(cfg, run_dir, stage, dist_ctx.world, changes[stage], data) if dist_ctx.main else {}
        try:
            summary = recipes[stage].run(cfg, data_dir, run_dir, dist_ctx)
        except (FileNotFoundError, ValueError) as err:  # a missing artifact or a bad input, named by the stage
            print(f"error: [{stage}, rank {dist_ctx.rank}] {err}", file=sys.stderr, flush=True)
            if dist_ctx.main and provenance.made_files(run_dir, stage) == files:
                provenance.restore(earlier)
            dist.destroy_process_group()
            return 2
        if stamp is not None and made.exists() and made.stat().st_mtime_ns == stamp:  # it had nothing left to do
            provenance.restore(earlier)
        if dist_ctx.main:
            print(json.dumps(summary, indent=1) if len(stages) == 1 else f"[{args.stage}] {stage}: finished", flush=True)
        gc.collect()
        dist.barrier()
    if dist_ctx.main and args.stage == "all":
        print(results_table(json.loads((run_dir / EVAL_METRICS).read_text())))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
