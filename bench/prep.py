"""Benchmark: the Spark pipeline vs a plain pandas implementation of the same protocol, same run.

    python bench/prep.py [--sizes 200000,2000000,20000000] [--pandas-max 20000000] [--mem-cap-gb 20] [--driver-memory 12g]
        [--driver-java-options=-XX:+UseParallelGC]

For each size a synthetic log is generated (pipeline/synth.py; users = rows/20, items = rows/100,
so 20M rows = 1M users x 200k items), then both implementations process it. Reported per size: wall
seconds, rows/s, peak memory (PSS) of the whole process tree (JVM + Python workers for Spark), Spark's
task seconds per prep step (from the run's event log, out/bench/events-<rows>), and the Spark/pandas
throughput ratio. pandas is stopped when its tree exceeds --mem-cap-gb (recorded as failed) so that the
machine survives. Results go to bench/results/prep.json and are printed as a table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.spark import DRIVER_JAVA_OPTIONS

SPARK_SUBMIT = str(Path(sys.executable).parent / "spark-submit")


def commit() -> str:
    """The checkout's commit, with `+dirty` when the pipeline or bench code differs from it (not the results)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "pipeline", "bench", ":!bench/results"], cwd=REPO, check=False).returncode != 0
    return head + ("+dirty" if dirty else "")


def tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return root.children(recursive=True)
    except psutil.Error:
        return []


def pss(p: psutil.Process) -> tuple[int, str]:
    """(proportional set size, name): shared pages are split between the processes that map them, so the JVM's
    short-lived forks (Hadoop's shell calls, named after the forking thread) are not counted as a second JVM, as
    summed RSS counts them (two 2M-row runs read 19.3 and 24.2 GiB by RSS; the JVM peaked at 12.8-12.9 GiB)."""
    try:
        return p.memory_full_info().pss, p.name()
    except psutil.Error:
        return 0, "gone"


def rss(p: psutil.Process) -> int:
    try:
        return p.memory_info().rss
    except psutil.Error:
        return 0


def measure(cmd: list[str], mem_cap_gb: float | None = None, every: float = 0.2, pss_every: float = 2.0) -> dict:
    """Run cmd; track the peak memory of its process tree (PSS, see pss()); kill it past mem_cap_gb (by RSS). The
    peak is kept with its time (seconds since the start) and its largest processes.

    A PSS reading walks the page tables of every process: one of a 10.6 GiB JVM took 150-400 ms, so reading it
    every 0.2 s (until 2026-12-06) kept most of a core busy and slowed the 20M-row run by a fifth. RSS is cheap and
    never below PSS, so the tree's RSS is sampled every `every` s and its PSS read only when the RSS passes the
    peak so far, at most every `pss_every` s: the peak is exact up to that sampling.
    Output goes to a file, not a pipe, so that a chatty run cannot fill the pipe and stall."""
    t0 = time.time()
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
                                     "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
        root, peak, peak_at, killed, at_peak, last_pss = psutil.Process(proc.pid), 0, 0.0, False, [], -pss_every
        while proc.poll() is None:
            procs = [root, *tree(root)]
            resident = sum(rss(p) for p in procs)
            if resident > peak and time.time() - last_pss >= pss_every:
                last_pss = time.time()
                each = [pss(p) for p in procs]
                used = sum(r for r, _ in each)
                if used > peak:
                    peak, peak_at, at_peak = used, time.time() - t0, sorted(each, reverse=True)[:4]
            if mem_cap_gb and resident > mem_cap_gb * 2**30:
                for p in [*tree(root), root]:
                    p.kill()
                killed = True
                break
            time.sleep(every)
        proc.wait()
        log.seek(0)
        out = log.read()
    return {"seconds": round(time.time() - t0, 1), "peak_gb": round(peak / 2**30, 2), "peak_at_s": round(peak_at, 1),
            "peak_processes": [f"{name} {r / 2**30:.2f} GiB" for r, name in at_peak],
            "ok": proc.returncode == 0 and not killed, "killed_at_cap": killed, "tail": out[-600:], "commit": commit(),
            "steps": steps(out)}


STEP = re.compile(r"^\[prep (\d)/\d\] (.*?)  \(\+(\d+)s\)$", re.MULTILINE)


def steps(out: str) -> list[tuple[str, int]]:
    """prep's progress lines: (step, seconds since prep started)."""
    return [(f"{m[1]} {m[2].split(' from ')[0]}", int(m[3])) for m in STEP.finditer(out)]


def task_seconds_by_step(event_dir: Path, marks: list[tuple[str, int]]) -> dict[str, float]:
    """Spark's executor run time (summed over tasks, i.e. CPU-side seconds on all cores) per prep step, from the
    run's event log: each stage counts for the step running when it was submitted. Steps are aligned to the
    application start, which is within a second or two of prep's own clock."""
    logs = sorted(event_dir.glob("*/events_*"), key=lambda p: p.stat().st_mtime)
    if not logs or not marks:
        return {}
    start, per_step = None, {name: 0.0 for name, _ in marks}
    for line in logs[-1].read_text().splitlines():
        e = json.loads(line)
        if e["Event"] == "SparkListenerApplicationStart":
            start = e["Timestamp"] / 1000
        elif e["Event"] == "SparkListenerStageCompleted" and start is not None:
            info = e["Stage Info"]
            run = sum(a.get("Value", 0) for a in info.get("Accumulables", [])
                      if a["Name"] == "internal.metrics.executorRunTime") / 1000
            at = info["Submission Time"] / 1000 - start
            name = [n for n, t in marks if t <= at][-1] if at >= marks[0][1] else marks[0][0]
            per_step[name] += run
    return {k: round(v, 1) for k, v in per_step.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="200000,2000000,20000000")
    ap.add_argument("--pandas-max", type=int, default=20_000_000, help="largest size to try with pandas")
    ap.add_argument("--mem-cap-gb", type=float, default=20.0)
    ap.add_argument("--driver-memory", default="12g", help="Spark's heap (local mode: the driver runs the tasks)")
    ap.add_argument("--driver-java-options", default=DRIVER_JAVA_OPTIONS,
                    help="JVM flags for Spark's driver (default: prep's, pipeline/spark.py); pass as --driver-java-options=...")
    ap.add_argument("--only", choices=("spark", "pandas"), help="run one side only (results merge by size; no ratio across invocations)")
    ap.add_argument("--workdir", type=Path, default=REPO / "out" / "bench")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "prep.json")
    args = ap.parse_args()
    submit = [SPARK_SUBMIT, "--driver-memory", args.driver_memory,
              *(["--driver-java-options", args.driver_java_options] if args.driver_java_options else [])]
    results = []
    for rows in [int(s) for s in args.sizes.split(",")]:
        raw, out_s, out_p = (args.workdir / f"{k}-{rows}" for k in ("raw", "spark", "pandas"))
        for d in (out_s, out_p):
            shutil.rmtree(d, ignore_errors=True)
        if not (raw / "items").exists():
            gen = measure([*submit, "pipeline/synth.py", "--rows", str(rows), "--users", str(rows // 20),
                           "--items", str(rows // 100), "--output", str(raw)])
            assert gen["ok"], gen["tail"]
        row = {"rows": rows, "users": rows // 20, "items": rows // 100}
        events = args.workdir / f"events-{rows}"
        if args.only != "pandas":
            shutil.rmtree(events, ignore_errors=True)
            events.mkdir(parents=True)
            row["spark"] = measure([*submit, "--conf", "spark.eventLog.enabled=true", "--conf",
                                    f"spark.eventLog.dir={events}", "--conf", "spark.eventLog.compress=false",
                                    "pipeline/prep.py", "--config", "configs/synthetic.yaml",
                                    "--input", str(raw), "--output", str(out_s)])
        if row.get("spark", {}).get("ok"):
            manifest = json.loads((out_s / "manifest.json").read_text())
            row["rows_out"] = manifest["rows_out"]
            row["spark"]["prep_seconds"] = manifest["seconds"]
            row["spark"]["driver_memory"] = args.driver_memory
            row["spark"]["driver_java_options"] = args.driver_java_options
            row["spark"].update({k: manifest["spark"][k] for k in ("jobs", "stages", "tasks")})
            row["spark"]["task_seconds_by_step"] = task_seconds_by_step(events, row["spark"]["steps"])
        if rows <= args.pandas_max and args.only != "spark":
            row["pandas"] = measure([sys.executable, "bench/prep_pandas.py", "--input", str(raw),
                                     "--output", str(out_p)], args.mem_cap_gb)
        for side in ("spark", "pandas"):
            if side in row and row[side]["ok"]:
                row[side]["rows_per_s"] = round(rows / row[side]["seconds"])
        if row.get("pandas", {}).get("ok") and row.get("spark", {}).get("ok"):
            row["speedup_spark_over_pandas"] = round(row["pandas"]["seconds"] / row["spark"]["seconds"], 2)
        results.append(row)
        print(json.dumps({k: v for k, v in row.items()}, default=str)[:900], flush=True)
        for d in (out_s, out_p):
            shutil.rmtree(d, ignore_errors=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if args.results.exists():  # merge with earlier results: other sizes, and the other side with --only
        earlier = {r["rows"]: r for r in json.loads(args.results.read_text())}
        for r in results:
            merged = {**earlier.pop(r["rows"], {}), **r}
            if "speedup_spark_over_pandas" not in r:  # a ratio only from both sides of one invocation
                merged.pop("speedup_spark_over_pandas", None)
            r.clear()
            r.update(merged)
        results = sorted([*results, *earlier.values()], key=lambda r: r["rows"])
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'rows':>11} {'spark s':>8} {'spark GB':>9} {'pandas s':>9} {'pandas GB':>10} {'ratio':>6}")
    for r in results:
        s, p = r.get("spark", {}), r.get("pandas", {})
        ps = p.get("seconds", "-") if p.get("ok") else ("cap" if p.get("killed_at_cap") else ("fail" if p else "-"))
        ss = s.get("seconds", "-") if s.get("ok") else ("fail" if s else "-")
        print(f"{r['rows']:>11,} {ss:>8} {s.get('peak_gb', '-'):>9} {ps:>9} "
              f"{p.get('peak_gb', '-'):>10} {r.get('speedup_spark_over_pandas', '-'):>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
