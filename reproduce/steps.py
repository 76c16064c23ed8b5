"""The step runner the reproductions share: eetool command lines run as subprocesses, in dependency order, a few at
a time; a step whose output exists is skipped and an interrupted one resumes, so rerunning continues a run."""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Step:
    name: str
    argv: list[str]
    output: Path
    needs: list[str] = field(default_factory=list)
    stdout: Path | None = None  # where the command's stdout (its data) is kept, when it succeeds


def run_steps(steps: list[Step], jobs: int) -> bool:
    """Run the steps whose outputs are missing, ``jobs`` at a time, in dependency order; True when all succeeded."""
    done = {s.name for s in steps if s.output.exists()}
    pending = [s for s in steps if s.name not in done]
    failed: set[str] = set()
    running: dict[Future[int], Step] = {}
    with ThreadPoolExecutor(jobs) as pool:
        while pending or running:
            for s in [s for s in pending if set(s.needs) <= done][: jobs - len(running)]:
                pending.remove(s)
                print(f"[{time.strftime('%H:%M:%S')}] start {s.name}", flush=True)
                running[pool.submit(run_step, s)] = s
            for s in [s for s in pending if set(s.needs) & failed]:
                pending.remove(s)
                failed.add(s.name)
                print(f"skip {s.name}: it needs a step that failed", flush=True)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                s = running.pop(f)
                if f.result() == 0:
                    done.add(s.name)
                    print(f"[{time.strftime('%H:%M:%S')}] done {s.name}", flush=True)
                else:
                    failed.add(s.name)
                    print(f"[{time.strftime('%H:%M:%S')}] FAILED {s.name} (see {s.name}.log)", flush=True)
    return not failed


def run_step(s: Step) -> int:
    """One step, its command line and stderr appended to ``<name>.log`` beside its output."""
    argv = s.argv
    if Path(f"{s.output}.resume").is_dir() or Path(f"{s.output}.resume.pt").is_file():
        argv = [*argv, "--resume"]  # an interrupted step continues after its last finished epoch or round
    with open(s.output.parent / f"{s.name}.log", "a") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=log, text=True)
    if proc.returncode == 0 and s.stdout is not None:
        s.stdout.write_text(proc.stdout)
        if s.output.suffix == ".json":  # a step whose output is its data on stdout
            s.output.write_text(proc.stdout)
    return proc.returncode
