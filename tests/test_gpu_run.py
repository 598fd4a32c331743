"""The GPU run's script path on CPU: `make gpu-payload`'s builder, then scripts/gpu/run.sh --dry-run (the tiny model,
1 gloo rank, as on the one-GPU host) unpacking those parts, checking the table kernel and running every comparison row, so that the
one-command GPU run cannot rot between the sessions that have a GPU host."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from launcher.artifacts import EVAL_METRICS, summary_file
from launcher.config import Config
from pipeline.config import load_config
from tests.conftest import REPO, SHARED_DATA

KIT = SHARED_DATA.parent / "gpu-host"
ROWS = ["sella", "text-only", "popularity", "mf", "collm-like", "sella-no-warm"]


@pytest.fixture(scope="module")
def payload(ml100k_out: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The parts for ML-100K's prep output, with the real kit when ../shared/gpu-host is there."""
    out = tmp_path_factory.mktemp("gpu") / "payload"
    kit = ["--kit", str(KIT)] if KIT.is_dir() else ["--no-kit"]
    proc = subprocess.run([sys.executable, "scripts/gpu/payload.py", "build", "--out", str(out), "--data",
                           str(ml100k_out), *kit], cwd=REPO, capture_output=True, text=True, check=True)
    return out, proc.stdout


def test_payload_parts_fit_one_transfer_each(payload: tuple[Path, str]) -> None:
    out, printed = payload
    manifest = json.loads((out / "part-1" / "MANIFEST.json").read_text())
    parts = sorted(out.glob("part-*"))
    assert len(parts) >= 2 and all(f"{p.name}:" in printed for p in parts)
    tracked = sum((REPO / f).stat().st_size for f in subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split() if (REPO / f).is_file())
    for part in parts:
        assert sum(f.stat().st_size for f in part.iterdir()) + tracked < 60 * 2**20, part.name
    pieces = [e for e in manifest["files"] if e["joins"] == manifest["model"]]
    assert len(pieces) >= 2 and manifest["data"] == ["data-ml-100k.tar.xz"]
    assert manifest["kit"] is KIT.is_dir()


def test_every_file_a_transfer_carries_counts_against_a_part(tmp_path: Path) -> None:
    """The device tool carries the tracked files and the untracked ones git does not ignore with every part: a
    scratch file left in the working tree counts, an ignored one does not."""
    sys.path.insert(0, str(REPO / "scripts" / "gpu"))
    from payload import tracked_bytes

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / ".gitignore").write_text("out/\n")
    (tmp_path / "tracked.py").write_bytes(b"x" * 1000)
    git("add", ".gitignore", "tracked.py")
    (tmp_path / "scratch.txt").write_bytes(b"y" * 300)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ignored.bin").write_bytes(b"z" * 5000)
    assert tracked_bytes(tmp_path) == len("out/\n") + 1000 + 300


def test_dry_run_runs_every_row_from_the_parts_then_the_benchmarks(payload: tuple[Path, str], tmp_path: Path) -> None:
    """Every row, then bench/llm_train.py and bench/collab.py (each with its baseline in the same run) through
    run.sh's bench path at a smoke-test size."""
    out, _ = payload
    results = tmp_path / "results"
    proc = subprocess.run(["bash", "scripts/gpu/run.sh", "--dry-run", "--data-name", "ml-100k", "--payload", str(out),
                           "--target", str(tmp_path / "target"), "--results", str(results), "--bench",
                           "--set", "lora.eval_rows=12",  # run.sh's overrides reach every launch,
                           "--set", "eval.splits=[valid, test]"],  # each value one argument, spaces and all
                          cwd=REPO, capture_output=True, text=True, check=False, env={
                              **os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "match the reference" in (results / "check.txt").read_text()
    timing = [line.split("\t") for line in (results / "timing.tsv").read_text().splitlines()[1:]]
    assert sorted((row, stage) for row, stage, *_ in timing) == sorted([
        ("sella", "lora"), ("sella", "distill,collab"), ("sella", "sella,eval"), ("text-only", "eval"),
        ("popularity", "eval"), ("mf", "collab,eval"), ("collm-like", "sella,eval"), ("sella-no-warm", "sella,eval"),
        ("bench-llm", "-"), ("bench-collab", "-")])
    assert all(status == "ok" for *_, status in timing), timing
    order = [(row, stage) for row, stage, *_ in timing]  # the lanes: a launch starts after what it reads
    assert order.index(("collm-like", "sella,eval")) > max(order.index(("sella", "lora")), order.index(("mf", "collab,eval")))
    assert order.index(("sella-no-warm", "sella,eval")) > order.index(("sella", "distill,collab"))
    assert len(list(results.rglob("*"))) <= 8  # the GPU tool brings back 8 files at most
    table, stage_table = (results / "table.md").read_text().split("\n\n")
    rows = table.splitlines()[2:]
    assert len(rows) == len(ROWS) and all("| 24 |" in line for line in rows)
    assert "| `runs/gpu/collm-ml-1m` | sella | 2 |" in stage_table and "| `runs/gpu/collm-ml-1m` | lora | 2 |" in stage_table
    with tarfile.open(results / "results.tar.gz") as tar:
        names = tar.getnames()
        lora = json.load(tar.extractfile(f"runs/gpu/collm-ml-1m/{summary_file('lora')}"))
        collm = json.load(tar.extractfile(f"runs/gpu/collm-ml-1m-collm/{summary_file('sella')}"))
        recorded = yaml.safe_load(tar.extractfile("runs/gpu/collm-ml-1m/lora/config.yaml"))
    assert f"runs/gpu/collm-ml-1m/{EVAL_METRICS}" in names and f"runs/gpu/collm-ml-1m/{summary_file('sella')}" in names
    assert any(n.startswith("runs/gpu/collm-ml-1m/tb/sella/events.") for n in names)
    assert not any(n.endswith((".safetensors", ".gguf")) or "/ckpt/" in n or "/export/" in n for n in names)
    assert "logs/sella-sella-eval.log" in names and "runs/gpu/collm-ml-1m/eval/scores-test.parquet" in names
    assert {"logs/bench-llm.log", "logs/bench-collab.log"} <= set(names)
    assert lora["valid"]["overall"]["rows"] == 12  # --set lora.eval_rows=12 over the dry run's 16
    # the record runs again with --config alone, from anywhere on the host: the prep output run.sh gave with --data (not
    # the config's data_dir) and the run directory under this call's working folder, both absolute
    work = (tmp_path / "target" / "work").resolve()
    assert recorded["data_dir"] == str((tmp_path / "target" / "data" / "ml-100k").resolve())
    assert Path(recorded["run_dir"]).parents[3] == work and recorded["run_dir"].endswith("/runs/gpu/collm-ml-1m")
    # CoLLM-like keeps the MF tables frozen, sharded as the GPU config shards them (that the rows stay as they were,
    # on FBGEMM's fused sharded tables too: tests/test_sella_stage.py::test_frozen_tables_stay_as_stage_2b_left_them)
    assert collm["table_optimizer"].startswith("none: train_tables false") and collm["sharding"] == "row_wise"
    assert (tmp_path / "target" / ".unpacked").is_file()  # a second run.sh on the same host skips the unpack

    llm = json.loads((results / "llm_train.json").read_text())
    llm_runs, hf_rate = llm["runs"], llm["runs"]["hf-trainer"]["tokens_per_s"]
    assert set(llm["speedup_vs_hf"]) == set(llm_runs) == {"hf-trainer", "hf-answer-logits", "ours-zero3", "ours-zero0"}
    assert all(run["tokens_per_s"] > 0 for run in llm_runs.values())
    assert llm["speedup_vs_hf"] == pytest.approx({n: r["tokens_per_s"] / hf_rate for n, r in llm_runs.items()}, rel=0.01)
    assert len({run["train_tokens"] for run in llm_runs.values()}) == 1  # the baseline trains on the same prompts
    # stage 1's loss inside the Trainer trains as the Trainer's own: the gradient norms differ by a few tenths of a
    # percent (the Trainer weights answer tokens over the accumulated batch, stage 1 weights micro-batches equally);
    # a loss left undivided by the gradient accumulation doubles them
    hf, answer_logits = llm["runs"]["hf-trainer"]["grad_norms"], llm["runs"]["hf-answer-logits"]["grad_norms"]
    assert len(hf) == 2 and answer_logits == pytest.approx(hf, rel=0.05)
    collab = json.loads((results / "collab.json").read_text())["sizes"]
    assert list(collab) == ["ml-1m"]
    bench = collab["ml-1m"]["runs"]
    assert "plain" in bench and all(run["samples_per_s"] > 0 for run in bench.values())
    assert {n: r["ratio_to_plain"] for n, r in bench.items()} == pytest.approx(
        {n: r["samples_per_s"] / bench["plain"]["samples_per_s"] for n, r in bench.items()}, rel=0.01)


@pytest.mark.integration  # starts a subprocess (bash scripts/gpu/run.sh)
def test_plan_of_some_rows_lists_their_launches_and_upstream(tmp_path: Path) -> None:
    """`--plan --rows mf,collm-like,sella-no-warm --bench`, what GPU run 5 left for a later host session: SeLLa-Rec's
    stages 1-2 run as the others' upstream, its stage 3 and test do not; then the two benchmarks. Nothing runs, and
    a real run's records in the same folder stay as they were."""
    results = tmp_path / "results"
    results.mkdir()
    earlier = {"timing.tsv": "row\tstage\tseconds\tstatus\nsella\tlora\t97\tok\n", "run.log": "an earlier run\n"}
    for name, text in earlier.items():
        (results / name).write_text(text)
    proc = subprocess.run(["bash", "scripts/gpu/run.sh", "--plan", "--rows", "mf,collm-like,sella-no-warm", "--bench",
                           "--target", str(tmp_path / "target"), "--results", str(results)],
                          cwd=REPO, capture_output=True, text=True, check=False, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    timing = [line.split("\t") for line in (results / "plan.tsv").read_text().splitlines()[1:]]
    assert sorted((row, stage) for row, stage, *_ in timing) == sorted([
        ("sella", "lora"), ("sella", "distill,collab"), ("mf", "collab,eval"), ("collm-like", "sella,eval"),
        ("sella-no-warm", "sella,eval"), ("bench-llm", "-"), ("bench-collab", "-")])
    assert all(status == "planned" for *_, status in timing), timing
    order = [(row, stage) for row, stage, *_ in timing]
    assert order.index(("collm-like", "sella,eval")) > order.index(("sella", "lora"))
    assert order.index(("sella-no-warm", "sella,eval")) > order.index(("sella", "distill,collab"))
    assert order.index(("bench-llm", "-")) > max(map(order.index, order[:5]))
    assert not (tmp_path / "target" / ".unpacked").exists() and sorted(p.name for p in results.iterdir()) == [
        "plan.log", "plan.tsv", "run.log", "timing.tsv"]
    assert {name: (results / name).read_text() for name in earlier} == earlier
    assert "plan: the launches of these flags" in (results / "plan.log").read_text()


@pytest.mark.integration  # starts subprocesses (bash scripts/gpu/run.sh)
def test_plan_caps_stage_3_by_the_time_left_and_runs_only_the_stages_rows_read(tmp_path: Path) -> None:
    """Each stage-3 launch trains for sella.max_minutes or until run.sh's reserve for its validations and test
    before the deadline, whichever comes first; stages 1 and 2a-2b run only for a row that reads them; every call
    gets a working folder of its own (a second call with other settings starts over)."""
    def plan(*flags: str, repo: Path = REPO) -> tuple[list[tuple[str, str]], list[tuple[str, int, float]]]:
        results = tmp_path / f"results-{len(list(tmp_path.glob('results-*')))}"
        proc = subprocess.run(["bash", "scripts/gpu/run.sh", "--plan", *flags, "--target", str(tmp_path / "target"),
                               "--results", str(results)], cwd=repo, capture_output=True, text=True, check=False,
                              env={**os.environ, "PYTHON": sys.executable})
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        launches = [tuple(line.split("\t")[:2]) for line in (results / "plan.tsv").read_text().splitlines()[1:]]
        caps = [(m[2], int(m[1]), float(m[3])) for m in re.finditer(  # (row, seconds since the start, cap)
            r"\[gpu-run \+(\d+)s\] (\S+): --stage sella,eval --set sella\.max_minutes=([\d.]+)",
            (results / "plan.log").read_text())]
        return launches, caps

    reserve = int(re.search(r"^STAGE3_RESERVE=(\d+)$", (REPO / "scripts/gpu/run.sh").read_text(), re.MULTILINE)[1])

    def capped(caps: list[tuple[str, int, float]], minutes: float, configured: dict[str, float]) -> bool:
        """Each cap is the row's configured minutes or the time to the deadline (--minutes less 30 s) less the reserve,
        whichever is less, as of when the launch read the time: the logged second, or up to 5 s before it. No bound on
        how fast the plan runs."""
        def cap(row: str, elapsed: int) -> float:
            return min(configured[row], max(0.1, (minutes * 60 - 30 - elapsed - reserve) / 60))
        return all(cap(row, t) - 0.006 <= c <= cap(row, max(0, t - 5)) + 0.006 for row, t, c in caps)

    stage3 = ["--rows", "mf,collm-like,sella-no-warm", "--set", "sella.max_minutes=2.5"]
    launches, caps = plan(*stage3)  # 9 minutes: the configured 2.5 fit unless the plan took minutes to get there
    assert ("sella", "distill,collab") in launches and len(caps) == 2
    assert capped(caps, 9, {"collm-like": 2.5, "sella-no-warm": 2.5}), caps
    launches, caps = plan("--minutes", "3.5", *stage3)  # 180 s to the deadline, 120 s of them kept for validation and test
    assert len(caps) == 2 and capped(caps, 3.5, {"collm-like": 2.5, "sella-no-warm": 2.5}), caps
    assert all(c < 1.01 for *_, c in caps)  # the time left, not the configured 2.5, caps these
    # the table kernels out (--no-tables, as after a failed check): stage 1 would serve none of these rows
    launches, caps = plan("--no-tables", "--rows", "mf,collm-like,sella,sella-no-warm,popularity")
    skipped = [("collm-like", "-"), ("mf", "-"), ("sella", "-"), ("sella-no-warm", "-")]  # "skipped: needs the table kernels"
    assert sorted(launches) == sorted([("popularity", "eval"), *skipped]) and caps == [], launches
    launches, caps = plan("--no-tables", "--rows", "sella,text-only")
    assert sorted(launches) == [("sella", "-"), ("sella", "lora"), ("text-only", "eval")] and caps == [], launches
    launches, caps = plan("--rows", "text-only,popularity")
    assert sorted(launches) == [("popularity", "eval"), ("sella", "lora"), ("text-only", "eval")] and caps == []
    launches, caps = plan("--rows", "popularity,mf")  # neither reads stage 1
    assert sorted(launches) == [("mf", "collab,eval"), ("popularity", "eval")] and caps == []
    assert len(list((tmp_path / "target" / "work").iterdir())) == 6

    # a row's own cap counts: a repository copy whose SeLLa-Rec without <Warm_ID> row sets 1.5 minutes
    copy = tmp_path / "repo"
    for part in ("scripts", "configs", "pipeline", "launcher", "llm", "embeddings"):
        shutil.copytree(REPO / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    row = copy / "configs" / "gpu" / "comparison" / "sella-no-warm.yaml"
    row.write_text(row.read_text() + "sella: {max_minutes: 1.5}\n")
    _, caps = plan("--rows", "mf,collm-like,sella,sella-no-warm", repo=copy)
    base = load_config(REPO / "configs/gpu/collm-ml-1m.yaml", schema=Config).sella.max_minutes
    assert sorted(row for row, *_ in caps) == ["collm-like", "sella", "sella-no-warm"], caps
    assert capped(caps, 9, {"sella": base, "collm-like": base, "sella-no-warm": 1.5}), caps


def test_step_probe_times_engine_and_plain_loop(ml100k_out: Path, tmp_path: Path) -> None:
    """bench/llm_step.py (the GPU host's first check of where a stage-1 step goes) on CPU with the tiny model."""
    out = tmp_path / "llm_step.json"
    subprocess.run([sys.executable, "bench/llm_step.py", "--config", "configs/ml-100k.yaml", "--data", str(ml100k_out),
                    "--set", "llm.model=tiny", "--micro", "8,16", "--steps", "1", "--out", str(out)],
                   cwd=REPO, check=True, capture_output=True, env={**os.environ, "MASTER_PORT": "29631", "OMP_NUM_THREADS": "1"})
    report = json.loads(out.read_text())
    assert sorted((r["mode"], r["micro_batch"], r["grad_accum"]) for r in report["runs"]) == [
        ("engine", 8, 16), ("engine", 16, 8), ("plain", 8, 16), ("plain", 16, 8)]
    for r in report["runs"]:
        assert r["prompts_per_s"] > 0 and r["nonfinite_grad_norm_steps"] == 0  # fp32 on CPU
        assert set(r["seconds_per_step"]) == {"data", "forward", "backward", "step"}
    assert "aten::" in report["runs"][1]["profile"]["by_host_time"]  # the first size's engine run is profiled
    assert set(report["over_plain"]) == {"engine/8", "engine/16"}


def test_dry_run_writes_the_launches_left_out_after_a_failure(payload: tuple[Path, str], tmp_path: Path) -> None:
    """Stage 1 fails (no such model: a --set value with a space, which must stay one argument), so the launch that
    reads its adapter, text-only, is written as skipped; popularity still runs; SeLLa-Rec's stages 2a-2b, which no
    listed row reads, are not planned at all."""
    out, _ = payload
    results = tmp_path / "results"
    proc = subprocess.run(["bash", "scripts/gpu/run.sh", "--dry-run", "--data-name", "ml-100k", "--payload", str(out),
                           "--target", str(tmp_path / "target"), "--results", str(results),
                           "--rows", "text-only,popularity", "--set", f"llm.model={tmp_path}/no such/model.gguf"],
                          cwd=REPO, capture_output=True, text=True, check=False, env={
                              **os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    timing = {(row, stage): status for row, stage, _, status in
              (line.split("\t") for line in (results / "timing.tsv").read_text().splitlines()[1:])}
    assert timing == {("sella", "lora"): "failed", ("popularity", "eval"): "ok",
                      ("text-only", "eval"): "skipped: upstream sella lora failed"}
    with tarfile.open(results / "results.tar.gz") as tar:
        assert "no such/model.gguf" in tar.extractfile("logs/sella-lora.log").read().decode()


@pytest.mark.integration  # starts subprocesses (scripts/gpu/payload.py)
def test_unpack_replaces_what_an_earlier_payload_left(tmp_path: Path) -> None:
    """A new payload with the same model but new prep outputs is unpacked on a host that unpacked an earlier one:
    its data replaces the earlier folder (no file of it stays); the same payload again is skipped."""
    model, prep, out, target = tmp_path / "m.gguf", tmp_path / "prep" / "ml-100k", tmp_path / "payload", tmp_path / "t"
    model.write_bytes(b"GGUF" * 1000)
    data = target / "data" / "ml-100k"

    def send(files: dict[str, str]) -> None:
        shutil.rmtree(prep, ignore_errors=True)
        prep.mkdir(parents=True)
        for name, text in files.items():
            (prep / name).write_text(text)
        subprocess.run([sys.executable, "scripts/gpu/payload.py", "build", "--out", str(out), "--data", str(prep),
                        "--no-kit", "--model", str(model)], cwd=REPO, capture_output=True, check=True)
        subprocess.run([sys.executable, "scripts/gpu/payload.py", "unpack", "--payload", str(out), "--target",
                        str(target), "--no-install"], cwd=REPO, capture_output=True, check=True)

    send({"manifest.json": "{}", "train.parquet": "old", "gone.parquet": "old"})
    assert sorted(p.name for p in data.iterdir()) == ["gone.parquet", "manifest.json", "train.parquet"]
    send({"manifest.json": "{}", "train.parquet": "new"})
    assert sorted(p.name for p in data.iterdir()) == ["manifest.json", "train.parquet"]
    assert (data / "train.parquet").read_text() == "new" and [p.read_bytes() for p in (target / "model").iterdir()] == [model.read_bytes()]
    (data / "train.parquet").write_text("changed on the host")
    subprocess.run([sys.executable, "scripts/gpu/payload.py", "unpack", "--payload", str(out), "--target", str(target),
                    "--no-install"], cwd=REPO, capture_output=True, check=True)
    assert (data / "train.parquet").read_text() == "changed on the host"  # the same payload: skipped


@pytest.mark.integration  # starts a subprocess (bash scripts/gpu/profile_lora.sh)
def test_profile_stops_at_a_failed_run(tmp_path: Path) -> None:
    """scripts/gpu/profile_lora.sh makes its results folder, and a run that fails stops it with the run's status
    (cProfile alone exits 0) before any summary is printed."""
    results = tmp_path / "results"
    proc = subprocess.run(["bash", "scripts/gpu/profile_lora.sh", str(tmp_path / "no-data"), "tiny", str(results), "1"],
                          cwd=REPO, capture_output=True, text=True, check=False, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"ZeRO-3: launcher/train.py exited with status 2 (log: {results}/lora-z3.log)" in proc.stderr
    assert "summary:" not in proc.stdout and "ZeRO-0" not in proc.stdout
    assert f"{tmp_path}/no-data/manifest.json: no prep output there; make it first" in (results / "lora-z3.log").read_text()


def test_a_damaged_part_is_named(payload: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = payload
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(out), str(broken)], check=True)
    piece = next(broken.glob("part-*/*.gguf.*"))
    piece.write_bytes(piece.read_bytes()[:-1])
    proc = subprocess.run([sys.executable, "scripts/gpu/payload.py", "unpack", "--payload", str(broken), "--target",
                           str(tmp_path / "t"), "--no-install"], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and f"{piece} is missing or damaged" in proc.stderr and piece.parent.name in proc.stderr


@pytest.mark.integration  # starts a subprocess (bash scripts/gpu/run.sh): not in make test-fast
@pytest.mark.parametrize(("rows", "error"), [
    ("sella,nope", "no row 'nope' (configs/gpu/comparison/nope.yaml)"),
    ("sella,collm-like", "collm-like reads mf's tables, list mf too"),
])
def test_rows_are_checked_before_anything_runs(rows: str, error: str, tmp_path: Path) -> None:
    """`run.sh --rows` (a subset when the host's time does not fit every row) names a bad list before it unpacks."""
    proc = subprocess.run(["bash", "scripts/gpu/run.sh", "--rows", rows, "--results", str(tmp_path / "r"),
                           "--target", str(tmp_path / "t")], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and error in proc.stderr
    assert not (tmp_path / "t").exists() and not (tmp_path / "r").exists()
