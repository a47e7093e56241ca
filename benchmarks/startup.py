"""What installing tood-yolo costs Ultralytics users who never use TOOD: start-up wall time, CPU time and peak memory.

    python benchmarks/startup.py                    # both cases, 7 interleaved runs per side (~3 min on 2 busy cores)
    python benchmarks/startup.py --runs 11 --cases import
    python benchmarks/startup.py --check            # exit 1 if a case misses the targets (<= 1.05x wall, <= +10 MB)
    git archive <rev> | tar -x -C /tmp/before && python benchmarks/startup.py --before /tmp/before   # + that version

Cases, each a new process as a user starts one:
- `import`: `python -c "from ultralytics import YOLO; YOLO"`;
- `predict`: `yolo predict model=yolo11n.pt source=bus.jpg imgsz=320 save=False` of Ultralytics' own yolo11n, with
  weights built here from `yolo11n.yaml` (untrained: start-up does not depend on them; nothing is downloaded).

Sides: the same interpreter and site-packages, with the installed start-up hook (`tood_yolo_hook`) and with it
switched off by `TOOD_YOLO_HOOK=0`, which the hook honours by installing nothing. Both sides then run the same
files; the one difference the switch leaves is the .pth line's `import tood_yolo_hook` (os and sys, already imported
at start-up, and one module of ~140 lines), which runs on both sides. The package must be installed (`pip install
-e .` or the wheel) so that the hook is there to switch.

Measures: wall time around the child; its CPU time (user + system) and peak resident memory (`ru_maxrss`) from
`os.wait4`, so each figure is that one child's. Runs alternate the sides, and which side goes first alternates every
round (ABBA...), so the machine's other load falls on both alike; one unrecorded warm-up per side first fills the page
cache. Reported: the median of the runs, and with-hook / alone ratios (wall, CPU) and difference (memory).

`--before DIR` adds a third side, interleaved with the other two: the tood-yolo of the source tree DIR (another
version, e.g. unpacked with `git archive`), put first on PYTHONPATH so that its `tood_yolo_hook` and package shadow the
installed ones when the .pth line imports the hook.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
ALONE, HOOK = "Ultralytics alone", "with tood-yolo"
SIDES = {ALONE: {"TOOD_YOLO_HOOK": "0"}, HOOK: {"TOOD_YOLO_HOOK": "1"}}  # each side's environment
TARGET_WALL, TARGET_MB = 1.05, 10.0


@dataclass(frozen=True)
class Run:
    wall_s: float
    cpu_s: float
    peak_mb: float


def run_once(cmd: list[str], env: dict, cwd: Path) -> Run:
    """Run `cmd` and measure it: wall time, and the child's own CPU time and peak RSS (os.wait4's rusage)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)  # waited for here: Popen must not wait again
        if p.returncode:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{err.read().decode()[-3000:]}")
    return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)  # ru_maxrss: KiB on Linux


def build_weights(folder: Path, env: dict) -> Path:
    """yolo11n.pt built from Ultralytics' yolo11n.yaml (random weights), with the hook switched off."""
    weights = folder / "yolo11n.pt"
    code = f"from ultralytics import YOLO; YOLO('yolo11n.yaml').save({str(weights)!r})"
    subprocess.run([sys.executable, "-c", code], env={**env, "TOOD_YOLO_HOOK": "0"}, cwd=folder, check=True)
    return weights


def cases(folder: Path, env: dict, names: list[str]) -> dict[str, tuple[str, list[str]]]:
    """Each case's command as shown in the report, and as run."""
    from ultralytics.utils import ASSETS

    out = {}
    if "import" in names:
        code = "from ultralytics import YOLO; YOLO"
        out["import"] = (f'python -c "{code}"', [sys.executable, "-c", code])
    if "predict" in names:
        # save=False: no annotated image, so no font look-up (Ultralytics alone would try to download Arial.ttf)
        args = ["predict", f"model={build_weights(folder, env)}", f"source={ASSETS / 'bus.jpg'}", "imgsz=320",
                "save=False"]
        shown = "yolo predict model=yolo11n.pt source=bus.jpg imgsz=320 save=False"
        out["predict"] = (shown, [str(BIN / "yolo"), *args])
    return out


def measure(cmd: list[str], env: dict, cwd: Path, runs: int, sides: dict[str, dict]) -> dict[str, list[Run]]:
    """`runs` runs of `cmd` per side, interleaved (ABBA...), after one unrecorded warm-up per side."""
    results = {side: [] for side in sides}
    for extra in sides.values():
        run_once(cmd, {**env, **extra}, cwd)
    for i in range(runs):
        order = list(sides.items()) if i % 2 == 0 else list(sides.items())[::-1]
        for side, extra in order:
            results[side].append(run_once(cmd, {**env, **extra}, cwd))
    return results


def table(name: str, shown: str, results: dict[str, list[Run]]) -> tuple[str, bool]:
    """A markdown table of the medians, and whether the with-hook side meets the targets."""
    med = {side: Run(*(statistics.median(getattr(r, f) for r in rs) for f in ("wall_s", "cpu_s", "peak_mb")))
           for side, rs in results.items()}
    alone = med[ALONE]
    ok = med[HOOK].wall_s / alone.wall_s <= TARGET_WALL and med[HOOK].peak_mb - alone.peak_mb <= TARGET_MB
    runs = len(next(iter(results.values())))
    lines = [f"`{name}`: `{shown}`, median of {runs} interleaved runs", "",
             "| side | wall (s) | CPU (s) | peak RSS (MB) |", "|---|---|---|---|"]
    lines += [f"| {side} | {r.wall_s:.2f} | {r.cpu_s:.2f} | {r.peak_mb:.0f} |" for side, r in med.items()]
    lines += [f"| {side} / alone | {r.wall_s / alone.wall_s:.3f}x | {r.cpu_s / alone.cpu_s:.3f}x | "
              f"{r.peak_mb - alone.peak_mb:+.1f} MB |" for side, r in med.items() if side != ALONE]
    lines.append(f"\ntargets (<= {TARGET_WALL}x wall, <= +{TARGET_MB:.0f} MB): {'met' if ok else 'MISSED'}")
    return "\n".join(lines), ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="recorded runs per side (after one warm-up each)")
    parser.add_argument("--cases", nargs="+", default=["import", "predict"], choices=["import", "predict"])
    parser.add_argument("--check", action="store_true", help="exit 1 if a case misses the targets")
    parser.add_argument("--before", type=Path, help="a source tree of another tood-yolo version: a third side")
    args = parser.parse_args()

    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false"}
    sides = dict(SIDES)
    if args.before:
        path = os.pathsep.join([str(args.before.resolve()), env.get("PYTHONPATH", "")])
        sides[f"tood-yolo of {args.before}"] = {"TOOD_YOLO_HOOK": "1", "PYTHONPATH": path}
    missed = False
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        env["YOLO_CONFIG_DIR"] = str(folder / "config")  # the runs' settings and fonts stay in the temp dir
        for name, (shown, cmd) in cases(folder, env, args.cases).items():
            text, ok = table(name, shown, measure(cmd, env, folder, args.runs, sides))
            print(text + "\n", flush=True)
            missed |= not ok
    return int(args.check and missed)


if __name__ == "__main__":
    sys.exit(main())
