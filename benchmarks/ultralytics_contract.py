"""Ultralytics' own tests as tood-yolo's contract: run the test suite of the installed Ultralytics version's source
distribution with and without the plugin, and list every test whose outcome differs.

    python benchmarks/ultralytics_contract.py                                  # tests/test_cli.py, tests/test_python.py
    python benchmarks/ultralytics_contract.py --tests tests                    # every test file of the sdist
    python benchmarks/ultralytics_contract.py --tests tests/test_cli.py -k "defer or predict" --out contract.md
    python benchmarks/ultralytics_contract.py --sdist ultralytics-8.4.190.tar.gz   # a source distribution on disk

Steps:
1. `pip download ultralytics==<installed version> --no-binary :all: --no-deps` (from the package index pip is set up
   for; `--sdist` skips it) and unpack its `tests/` alone into a temp dir: the tests run against the installed
   Ultralytics, not the sdist's copy of it.
2. Offline-safe stand-ins, made once with the hook switched off and copied to both sides: untrained weights built
   from Ultralytics' own YAMLs under the names the tests load (`STANDINS`; training does not change what these tests
   check: that each mode runs), in Ultralytics' weights_dir and its "path with spaces" folder, and coco8 from
   `--data` (default ../shared/data/coco8) in its datasets_dir. Anything else the tests fetch (other datasets, CLIP,
   solution videos) is not there on either side.
3. Each side gets its own Ultralytics settings (weights, datasets, runs folders: `YOLO_CONFIG_DIR`), YOLO_OFFLINE=1,
   YOLO_AUTOINSTALL=false, and the network guard of tests/netguard (every connection attempt fails at once and is
   logged, so a test that wants a download fails the same way on both sides, without waiting on a timeout). The one
   difference: `TOOD_YOLO_HOOK=0` (Ultralytics alone) or `1` (with tood-yolo's start-up hook, as installed).
4. Both sides run at once (`--sequential`: one after the other) with pytest's JUnit XML, and their outcomes (passed,
   failed, error, skipped) are compared test by test. Exit status 1 when any outcome differs.

The package must be installed (`pip install -e .` or the wheel), so that the hook is there to switch.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NETGUARD = ROOT / "tests" / "netguard"
SIDES = {"alone": "0", "tood-yolo": "1"}  # TOOD_YOLO_HOOK of each side
# The weights files the tests of test_cli.py and test_python.py load by name, and the Ultralytics YAML each is built
# from (random weights). Others (yolo11n-grayscale, yoloe-*, mobile_sam, FastSAM-s) are not built: absent on both sides.
STANDINS = {
    "yolo26n.pt": "yolo26n.yaml", "yolo26n-seg.pt": "yolo26n-seg.yaml", "yolo26n-sem.pt": "yolo26n-sem.yaml",
    "yolo26n-depth.pt": "yolo26n-depth.yaml", "yolo26n-cls.pt": "yolo26n-cls.yaml",
    "yolo26n-pose.pt": "yolo26n-pose.yaml", "yolo26n-obb.pt": "yolo26n-obb.yaml", "yolo11n.pt": "yolo11n.yaml",
    "yolo26s.pt": "yolo26s.yaml", "yolo26s-seg.pt": "yolo26s-seg.yaml", "yolo26s-pose.pt": "yolo26s-pose.yaml",
    "yolo26s-obb.pt": "yolo26s-obb.yaml", "rtdetr-l.pt": "rtdetr-l.yaml",
}
OUTCOMES = {"failure": "failed", "error": "error", "skipped": "skipped"}  # JUnit XML's element -> pytest's word
SPACES = "path with spaces"  # tests/__init__.py's MODEL lives in this folder of weights_dir
PYTEST_INI = """[pytest]
markers =
    slow: skip slow tests unless --slow is set
filterwarnings =
    ignore::torch.jit.TracerWarning
"""  # the sdist's pyproject options, less --doctest-modules (its package source is not unpacked) and --color


def fetch_sdist(version: str, folder: Path) -> Path:
    """The source distribution of ultralytics==version, downloaded by pip into folder."""
    subprocess.run([sys.executable, "-m", "pip", "download", f"ultralytics=={version}", "--no-binary", ":all:",
                    "--no-deps", "-q", "-d", str(folder)], check=True)
    return next(folder.glob(f"ultralytics-{version}.tar.gz"))


def unpack_tests(sdist: Path, dst: Path) -> None:
    """The sdist's tests/ folder (and nothing else) into dst/tests."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.split("/")[1:2] == ["tests"]]
        if not members:
            raise FileNotFoundError(f"{sdist}: no tests/ folder in this source distribution")
        for m in members:
            m.name = m.name.split("/", 1)[1]
        tar.extractall(dst, members=members, filter="data")
    (dst / "pytest.ini").write_text(PYTEST_INI)


def build_standins(folder: Path, env: dict) -> list[str]:
    """Untrained weights for STANDINS in folder, built with the hook off; returns the names that failed to build."""
    code = (
        "import json, sys\nfrom ultralytics import RTDETR, YOLO\nfailed = []\n"
        "for name, yaml in json.loads(sys.argv[1]).items():\n"
        "    try:\n        (RTDETR if name.startswith('rtdetr') else YOLO)(yaml).save(sys.argv[2] + '/' + name)\n"
        "    except Exception as e:\n        failed.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print(json.dumps(failed))"
    )
    p = subprocess.run([sys.executable, "-c", code, json.dumps(STANDINS), str(folder)], cwd=folder, check=True,
                       env={**env, "TOOD_YOLO_HOOK": "0"}, capture_output=True, text=True)
    return json.loads(p.stdout.splitlines()[-1])


def prepare_side(side: Path, tests: Path, standins: Path, data: Path | None, settings: dict) -> dict:
    """The side's folders (tests, weights, datasets, runs, settings) and the environment pytest runs with there."""
    shutil.copytree(tests, side / "work")
    dirs = {k: side / k.removesuffix("_dir") for k in ("datasets_dir", "weights_dir", "runs_dir")}
    for folder in (dirs["weights_dir"], dirs["weights_dir"] / SPACES):
        shutil.copytree(standins, folder, dirs_exist_ok=True)
    if data is not None:
        shutil.copytree(data, dirs["datasets_dir"] / data.name)
    (side / "config" / "Ultralytics").mkdir(parents=True)
    (side / "config" / "Ultralytics" / "settings.json").write_text(
        json.dumps({**settings, **{k: str(v) for k, v in dirs.items()}, "sync": False}))
    return {"YOLO_CONFIG_DIR": str(side / "config"), "TOOD_NETGUARD_LOG": str(side / "network.log"),
            "PYTHONPATH": os.pathsep.join([str(NETGUARD), os.environ.get("PYTHONPATH", "")])}


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """Each test ('module.Class::name', as JUnit names it) -> (outcome, its message's first line), from JUnit XML."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        result = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        outcome = OUTCOMES.get(getattr(result, "tag", ""), "passed")
        message = (result.get("message") or "").strip() if result is not None else ""
        first_line = message.splitlines()[0][:200] if message else ""
        out[f"{case.get('classname')}::{case.get('name')}"] = (outcome, first_line)
    return out


def report(results: dict[str, dict[str, tuple[str, str]]], command: str, missing: list[str]) -> tuple[str, int]:
    """Markdown: each side's counts, and every test whose outcome differs (or that ran on one side only)."""
    alone, tood = results["alone"], results["tood-yolo"]
    lines = [f"Command: `{command}`", ""]
    for side, res in results.items():
        counts = {o: sum(v[0] == o for v in res.values()) for o in ("passed", "failed", "error", "skipped")}
        lines.append(f"- {side}: {len(res)} tests, " + ", ".join(f"{n} {o}" for o, n in counts.items()))
    if missing:
        lines.append(f"- stand-ins not built (absent on both sides): {'; '.join(missing)}")
    absent = ("absent", "")
    differ = sorted(t for t in alone.keys() | tood.keys() if alone.get(t, absent)[0] != tood.get(t, absent)[0])
    lines += ["", f"Tests whose outcome differs: {len(differ)}"]
    if differ:
        lines += ["", "| test | alone | with tood-yolo | message (with tood-yolo) |", "|---|---|---|---|"]
        for t in differ:
            a, b = alone.get(t, absent), tood.get(t, absent)
            lines.append(f"| `{t}` | {a[0]} | {b[0]} | {(b[1] or a[1]).replace('|', '/')} |")
    return "\n".join(lines), len(differ)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tests", nargs="+", default=["tests/test_cli.py", "tests/test_python.py"],
                        help="test files or folders of the sdist, relative to its root")
    parser.add_argument("-k", default="", help="pytest's -k expression, on both sides")
    parser.add_argument("--sdist", type=Path, help="an Ultralytics source distribution on disk (else pip downloads)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "coco8",
                        help="coco8, placed in each side's datasets_dir (skipped if it does not exist)")
    parser.add_argument("--sequential", action="store_true", help="run the sides one after the other")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (logs, JUnit XML), not a temp dir")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args()

    version = importlib.metadata.version("ultralytics")
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false"}
    work = args.keep or Path(tempfile.mkdtemp(prefix="ultralytics_contract_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        sdist = args.sdist or fetch_sdist(version, work / "sdist")
        unpack_tests(sdist, work / "tests")
        (work / "standins").mkdir()
        missing = build_standins(work / "standins", env)
        from ultralytics.utils import SETTINGS

        settings = dict(SETTINGS)
        data = args.data if args.data.is_dir() else None
        cmd = [sys.executable, "-m", "pytest", *args.tests, "-p", "no:cacheprovider", "-q", "-rN"]
        cmd += ["-k", args.k] if args.k else []
        procs = {}
        for side, switch in SIDES.items():
            side_env = {**env, **prepare_side(work / side, work / "tests", work / "standins", data, settings),
                        "TOOD_YOLO_HOOK": switch}
            with open(work / side / "pytest.log", "w") as log:
                procs[side] = subprocess.Popen([*cmd, f"--junitxml={work / side / 'junit.xml'}"], env=side_env,
                                               cwd=work / side / "work", stdout=log, stderr=subprocess.STDOUT)
            if args.sequential:
                procs[side].wait()
        for p in procs.values():
            p.wait()
        results = {side: outcomes(work / side / "junit.xml") for side in SIDES}
        shown = f"python benchmarks/ultralytics_contract.py --tests {' '.join(args.tests)}"
        shown += f" -k {args.k!r}" if args.k else ""
        text, n = report(results, f"{shown}  # ultralytics {version}", missing)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        return int(n > 0)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
