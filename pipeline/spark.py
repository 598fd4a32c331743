"""Spark session set-up: loopback-only on local masters, UTC, and the master chosen by spark-submit wins."""
from __future__ import annotations

import os
import sys

from pyspark import SparkConf
from pyspark.sql import SparkSession

from pipeline.config import SparkConfig

SPLITS_PER_CORE = 4  # input splits per core (get_spark says why)

# The garbage collector for prep's JVM: a batch job wants throughput. G1's concurrent threads compete with the tasks
# for the cores and its bookkeeping sits beside the heap: at 20M rows on 2 cores the JVM peaked at 12.08 GiB against
# 12.93 and the run took 484.9 s against 526.5 (one run each, docs/benchmarks.md). Under spark-submit pass it as
# `--driver-java-options`; when Python starts the JVM (tests, notebooks) get_spark sets it.
DRIVER_JAVA_OPTIONS = "-XX:+UseParallelGC"


def is_local(master: str) -> bool:
    return master == "local" or master.startswith("local[")


def get_spark(cfg: SparkConfig, master: str | None = None, app: str = "sellarec-prep") -> SparkSession:
    """Start (or reuse) a Spark session.

    Master precedence: the `master` argument (--master of prep.py), then what spark-submit set
    (`spark.master`), then the config's default (`local[*]`). Local masters bind to 127.0.0.1 only.
    """
    submitted = SparkConf().get("spark.master", None)
    master = master or submitted or cfg.master
    builder = (
        SparkSession.builder.appName(app)
        .master(master)
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", str(cfg.shuffle_partitions))
        .config("spark.sql.autoBroadcastJoinThreshold", f"{cfg.broadcast_mb}m")
        .config("spark.sql.requireAllClusterKeysForCoPartition", "false")
        .config("spark.ui.enabled", str(cfg.ui).lower())
        .config("spark.ui.showConsoleProgress", str(sys.stderr.isatty()).lower())
        .config("spark.sql.adaptive.enabled", "true")
        .config("spark.log.level", "WARN")
    )
    if is_local(master):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        builder = (
            builder.config("spark.driver.host", "127.0.0.1")
            .config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.driver.memory", cfg.driver_memory)
            .config("spark.driver.extraJavaOptions", DRIVER_JAVA_OPTIONS)
        )
    spark = builder.getOrCreate()
    # Input scans: at least SPLITS_PER_CORE splits per core, so that the cores finish together (Spark's default is one
    # per core, capped at 128 MB a split: 300 MB of Parquet on 2 cores made 3 tasks, and one core sat out the last).
    spark.conf.set("spark.sql.files.minPartitionNum", str(SPLITS_PER_CORE * spark.sparkContext.defaultParallelism))
    return spark


def job_ids(spark: SparkSession) -> frozenset[int]:
    """The ids of the jobs the session has run so far (prep sets no job groups)."""
    return frozenset(spark.sparkContext.statusTracker().getJobIdsForGroup(None))


def plan_cost(spark: SparkSession, before: frozenset[int] = frozenset()) -> dict[str, int]:
    """Spark jobs and stages run since `before` (job_ids at the start; a session may run several preps), counting
    the stages that ran tasks (skipped ones reused a shuffle), as the manifest and bench/prep.py report them."""
    tracker = spark.sparkContext.statusTracker()
    jobs = [tracker.getJobInfo(j) for j in job_ids(spark) - before]
    stage_ids = {s for job in jobs if job is not None for s in job.stageIds}
    stages = [tracker.getStageInfo(s) for s in stage_ids]
    return {"jobs": len(jobs), "stages": sum(1 for s in stages if s is not None and s.numCompletedTasks > 0),
            "tasks": sum(s.numCompletedTasks for s in stages if s is not None)}
