"""Wheels for the GPU device machine: fills `.whl/` with what its image lacks to run the pipeline.

    python3 bench/device_bundle.py [--dest DIR] [--python-version 3.12] [--cache DIR]

Run here (it needs PyPI; the device machine has no network). The device image ('cuda', see the
device notes) has Python 3.12 with torch, numpy, pyarrow, pandas, click, rich, pyyaml, requests,
protobuf, msgpack, filelock, fsspec, packaging, aiohttp, matplotlib, tensorboard, ... but no Ray.
What `moola-pipeline train` (local mode and a local Ray with Ray Train V2), bench/gpu_step.py and
bench/gpu_ddp.py need there is ray[train]==2.60.0 plus those of its requirements the image lacks:
they are found by resolving ray[train] for cp312 manylinux x86-64 (pip's dry-run report) and
walking its requirement graph, stopping at packages the image holds (their own needs are the
image's business; ALSO_CARRY names the exception, typing-extensions). The pipeline's other third-party imports are in the image already: boto3
(SeaweedFS dev stack only) and runpod (`moola-pipeline runpod` only) are imported lazily, and
`pipeline.cli` imports neither at start, so neither travels.

Ray's wheel (79 MB) is over what a device call carries, so it is repacked without ray/jars/ (the
Java worker, 31 MB) and without their RECORD lines. Each other wheel is copied as PyPI serves it.
The bundle and the working tree that travels with it (tracked and untracked, not ignored, files)
must stay under 60 MiB: otherwise this exits 1 with one line on stderr. It adds `/.whl/` to
.git/info/exclude (the device tool carries only ignored paths named in `carry`) and writes
.whl/BUNDLE.txt (name, version, bytes, sha256 of each wheel). Wheels in the destination that are
not part of the new set are deleted, so it always holds one version of each.

`--dest DIR --python-version 3.11` builds the same set for another Python (the CPU simulation of
the device image on this 3.11 machine); then there is no size check and no exclude line.
On the device: `bash bench/device_check.sh` installs and uses the bundle.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_MIB = 60  # the device tool carries at most 64 MiB; keep a margin
RAY = "ray"
RAY_VERSION = "2.60.0"
ROOTS = [f"{RAY}[train]=={RAY_VERSION}"]
RAY_DROP = ("ray/jars/",)  # the Java worker; nothing here starts Java workers

# The device image's Python packages (device notes, KINDS.md, "Python packages already there",
# as read on 2026-11-17). A requirement on one of these stops the walk: it is not carried.
IMAGE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp
""".split()
# Never carried, whatever a resolution says: the image's builds are the ones to measure.
NEVER = {"torch", "numpy", "pyarrow"}
# Carried although the image has them, when a carried wheel requires them: pydantic 2.14 and
# pydantic-core 2.50 (imported by `import ray.train`) need typing-extensions>=4.16.0, the newest
# release when this was written, and the image's version is not known here. It is pure Python
# and backward compatible, so shadowing the image's copy on PYTHONPATH is safe.
ALSO_CARRY = {"typing-extensions"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


IMAGE = {norm(n) for n in IMAGE_PACKAGES} | NEVER


def platform_args(py: str) -> list[str]:
    """pip's flags for CPython `py` wheels on manylinux x86-64 (pip matches each tag exactly)."""
    tag = "cp" + py.replace(".", "")
    args = ["--only-binary=:all:", "--python-version", py, "--implementation", "cp",
            "--abi", tag, "--abi", "abi3", "--abi", "none"]
    plats = [f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)]
    plats += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    for p in plats:
        args += ["--platform", p]
    return args


def pip(args: list[str], what: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        noise = "is ignored: it is neither a file nor a directory"  # this machine's pip config
        err = "\n".join(l for l in proc.stderr.splitlines() if noise not in l)
        sys.exit(f"error: pip {what} failed:\n{proc.stdout[-2000:]}\n{err[-3000:]}")


def resolve(py: str, work: Path) -> list[dict]:
    """pip's report of a fresh install of ROOTS for CPython `py` on manylinux x86-64."""
    report = work / "report.json"
    pip(["install", "--dry-run", "--ignore-installed", "--quiet", "--target", str(work / "t"),
         "--report", str(report), *platform_args(py), *ROOTS], "resolve")
    return json.loads(report.read_text())["install"]


def marker_env(py: str) -> dict:
    return {"python_version": py, "python_full_version": f"{py}.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "platform_release": "", "platform_version": "", "implementation_version": f"{py}.0"}


def carried_set(items: list[dict], py: str) -> list[dict]:
    """Walk the requirement graph from ROOTS; a package the image holds ends its branch (unless
    it is in ALSO_CARRY)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip always has its own copy
        from pip._vendor.packaging.requirements import Requirement
    by_name = {norm(i["metadata"]["name"]): i for i in items}
    env = marker_env(py)
    todo = [(norm(Requirement(r).name), set(Requirement(r).extras)) for r in ROOTS]
    seen: dict[str, set] = {}
    while todo:
        name, extras = todo.pop()
        if name in IMAGE and name not in ALSO_CARRY:
            continue
        if name in seen and extras <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | extras
        if name not in by_name:
            sys.exit(f"error: {name} is required but not in pip's resolution")
        for text in by_name[name]["metadata"].get("requires_dist") or []:
            req = Requirement(text)
            active = [""] + sorted(seen[name])
            if req.marker is not None and not any(
                    req.marker.evaluate(dict(env, extra=e)) for e in active):
                continue
            todo.append((norm(req.name), set(req.extras)))
    return [by_name[n] for n in sorted(seen)]


def wheel_name(item: dict) -> str:
    return item["download_info"]["url"].rsplit("/", 1)[-1].split("#", 1)[0]


def download(items: list[dict], py: str, cache: Path) -> None:
    missing = [i for i in items if not (cache / wheel_name(i)).is_file()]
    if missing:
        specs = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in missing]
        print(f"downloading {len(specs)} wheel(s) for cp{py.replace('.', '')}: {' '.join(specs)}",
              flush=True)
        pip(["download", "--no-deps", "--quiet", "-d", str(cache), *platform_args(py), *specs],
            "download")
    for i in items:
        if not (cache / wheel_name(i)).is_file():
            sys.exit(f"error: pip download did not produce {wheel_name(i)} in {cache}")


def slim_ray(src: Path, dst: Path) -> None:
    """Copy the ray wheel without RAY_DROP entries and without their RECORD lines."""
    tmp = dst.with_name(dst.name + ".part")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED,
                                                      compresslevel=9) as zout:
        for info in zin.infolist():
            if info.filename.startswith(RAY_DROP):
                continue
            data = zin.read(info)
            if re.fullmatch(r"ray-[^/]+\.dist-info/RECORD", info.filename):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(l for l in lines if not l.startswith(RAY_DROP)).encode()
            out = zipfile.ZipInfo(info.filename, info.date_time)
            out.external_attr, out.create_system = info.external_attr, info.create_system
            out.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(out, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    os.replace(tmp, dst)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def travelling_tree_bytes() -> int:
    """Bytes of what the device tool sends besides carried paths: tracked files and untracked
    files that git does not ignore."""
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], capture_output=True, check=True).stdout
    total = 0
    for rel in set(filter(None, out.decode().split("\0"))):
        try:
            total += os.lstat(REPO / rel).st_size
        except FileNotFoundError:  # deleted but still tracked
            pass
    return total


def ensure_excluded() -> None:
    rel = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--git-path", "info/exclude"],
                         capture_output=True, text=True, check=True).stdout.strip()
    path = Path(rel) if os.path.isabs(rel) else REPO / rel
    lines = path.read_text().splitlines() if path.exists() else []
    if "/.whl/" not in (l.strip() for l in lines):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            if lines and not path.read_text().endswith("\n"):
                f.write("\n")
            f.write("/.whl/\n")
        print(f"added /.whl/ to {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=REPO / ".whl",
                    help="where the wheels go [REPO/.whl: the device bundle, size-checked]")
    ap.add_argument("--python-version", default="3.12", help="the device image's is 3.12")
    ap.add_argument("--cache", type=Path, default=None,
                    help="downloads kept here [$TMPDIR/moola-device-wheels/cpXY]")
    args = ap.parse_args()
    py = args.python_version
    device_bundle = args.dest.resolve() == (REPO / ".whl").resolve()
    cache = args.cache or Path(tempfile.gettempdir(), "moola-device-wheels",
                               "cp" + py.replace(".", ""))
    cache.mkdir(parents=True, exist_ok=True)
    dest = args.dest
    dest.mkdir(parents=True, exist_ok=True)
    if device_bundle:
        ensure_excluded()

    with tempfile.TemporaryDirectory(prefix="moola-bundle-") as work:
        items = carried_set(resolve(py, Path(work)), py)
    download(items, py, cache)

    names = {wheel_name(i) for i in items}
    for old in dest.glob("*.whl"):
        if old.name not in names:
            old.unlink()
            print(f"removed {old.name} (not in this set)")
    rows = []
    for i in items:
        name, src = wheel_name(i), cache / wheel_name(i)
        dst = dest / name
        if norm(i["metadata"]["name"]) == RAY:
            marker = dest / f".{name}.from"  # the source the slim copy was made from
            stamp = f"{src.stat().st_size} {src.stat().st_mtime_ns}"
            if not dst.exists() or not marker.exists() or marker.read_text() != stamp:
                print(f"repacking {name} without {', '.join(RAY_DROP)} "
                      f"({src.stat().st_size / 2**20:.1f} MiB)...", flush=True)
                slim_ray(src, dst)
                marker.write_text(stamp)
        elif not dst.exists() or dst.stat().st_size != src.stat().st_size:
            shutil.copyfile(src, dst)
        rows.append((i["metadata"]["name"], i["metadata"]["version"], dst))

    lines = [f"# wheels for the device image (cp{py.replace('.', '')}, manylinux x86-64): "
             f"{' '.join(ROOTS)} less what the image holds; made by bench/device_bundle.py"]
    total = 0
    print(f"{'package':<28} {'version':<18} {'MiB':>7}  wheel")
    for name, version, path in rows:
        size = path.stat().st_size
        total += size
        kind = "pure" if path.name.endswith("-none-any.whl") else "binary"
        print(f"{name:<28} {version:<18} {size / 2**20:>7.2f}  {path.name}")
        lines.append(f"{name} {version} {size} {sha256(path)} {path.name} {kind}")
    (dest / "BUNDLE.txt").write_text("\n".join(lines) + "\n")
    print(f"{len(rows)} wheels, {total / 2**20:.2f} MiB in {dest}")
    if device_bundle:
        tree = travelling_tree_bytes()
        together = (tree + total) / 2**20
        print(f"working tree that travels: {tree / 2**20:.2f} MiB; with .whl: {together:.2f} MiB "
              f"(limit {LIMIT_MIB} MiB; the device tool's is 64)")
        if together > LIMIT_MIB:
            print(f"error: .whl ({total / 2**20:.1f} MiB) plus the working tree "
                  f"({tree / 2**20:.1f} MiB) is {together:.1f} MiB, over {LIMIT_MIB} MiB",
                  file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
