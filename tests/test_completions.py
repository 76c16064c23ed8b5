"""Shell completion: completions/ is current, completion works through the real program, without torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eetool.commands import COMMANDS
from eetool.completion_scripts import SHELL_FILES, generate, prog_and_var

ROOT = Path(__file__).resolve().parents[1]
COMPLETIONS = ROOT / "completions"


def _complete_bash(words: str, cword: int, *extra: str) -> subprocess.CompletedProcess[str]:
    """Ask ``python -m eetool`` for bash completions the way the bash script does, via environment variables."""
    _, var = prog_and_var()
    env = {**os.environ, "COMP_WORDS": words, "COMP_CWORD": str(cword), var: "complete_bash"}
    return subprocess.run([sys.executable, *extra, "-m", "eetool"], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_completions_dir_is_current() -> None:
    expected = generate()
    assert set(SHELL_FILES) <= set(expected)
    stale = [name for name, text in expected.items()
             if not (COMPLETIONS / name).is_file() or (COMPLETIONS / name).read_text(encoding="utf-8") != text]
    assert not stale, f"completions/ is stale ({', '.join(stale)}): run `make completions` and commit the result"


def test_complete_var_is_typers() -> None:
    assert prog_and_var() == ("eetool", "_EETOOL_COMPLETE")


def test_bash_completes_every_subcommand() -> None:
    proc = _complete_bash("eetool ", 1)
    assert proc.returncode == 0, proc.stderr
    assert set(proc.stdout.split()) >= set(COMMANDS)


def test_bash_completes_a_prefix() -> None:
    proc = _complete_bash("eetool cal", 1)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["calibrate-means"]
    proc = _complete_bash("eetool evaluate", 1)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["evaluate", "evaluate-lm"]


def test_bash_completes_options_and_values() -> None:
    proc = _complete_bash("eetool train --ar", 2)
    assert proc.returncode == 0, proc.stderr
    assert set(proc.stdout.split()) == {"--arch", "--arch-args"}
    proc = _complete_bash("eetool train --arch resnet2", 3)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["resnet20"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_generated_bash_script_works_in_bash(tmp_path: Path) -> None:
    """Source completions/eetool.bash in a real bash and call its completion function."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "eetool"  # the script runs `eetool`; make it this interpreter's eetool
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m eetool "$@"\n')
    wrapper.chmod(0o755)
    script = (
        f'source "{COMPLETIONS / "eetool.bash"}"\n'
        'COMP_WORDS=(eetool ""); COMP_CWORD=1; _eetool_completion eetool\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
        'echo ---\n'
        'COMP_WORDS=(eetool train --ar); COMP_CWORD=2; _eetool_completion eetool\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    commands, options = proc.stdout.split("---\n")
    assert set(commands.split()) >= set(COMMANDS)
    assert set(options.split()) == {"--arch", "--arch-args"}


def test_completion_does_not_import_torch() -> None:
    # In-process: run the app with the completion variable set, then look at sys.modules.
    code = (
        "import os, sys\n"
        "from eetool.cli import app\n"
        "try:\n"
        "    app(prog_name='eetool')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
        "print('HEAVY:' + ','.join(heavy), file=sys.stderr)\n"
    )
    _, var = prog_and_var()
    for words, cword in (("eetool ", 1), ("eetool train --ar", 2), ("eetool train --arch r", 3)):
        env = {**os.environ, "COMP_WORDS": words, "COMP_CWORD": str(cword), var: "complete_bash"}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip(), f"no completions for {words!r}"
        assert "HEAVY:\n" in proc.stderr, f"completing {words!r} imported: {proc.stderr}"

    # Through the real entry point, as the import log sees it.
    proc = _complete_bash("eetool train --arch r", 3, "-X", "importtime")
    assert proc.returncode == 0, proc.stderr
    assert "resnet20" in proc.stdout.split()
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert imported, "no -X importtime output"
    assert not [m for m in imported if m.split(".")[0] == "torch"]


# Every option with a fixed set of values completes them (a few values of each are enough to check).
CHOICES = [
    ("fit-thresholds", "--method", {"e2cm", "sdn", "entropy", "e2cm+sdn"}),
    ("fit-thresholds", "--search", {"greedy", "bisect"}),
    ("fit-thresholds", "--combine", {"and", "or"}),
    ("fit-thresholds", "--data", {"demo", "fashion-mnist", "folder:"}),
    ("fit-thresholds", "--split", {"train", "test"}),
    ("evaluate", "--arch", {"resnet18", "resnet20", "mobilenet_v3_small"}),
    ("evaluate", "--data", {"demo", "mnist", "safetensors:"}),
    ("evaluate", "--split", {"train", "test"}),
    ("evaluate", "--point", {"all"}),
    ("evaluate", "--format", {"text", "json"}),
    ("evaluate", "--device", {"cpu", "cuda", "auto"}),
    ("evaluate", "--count", {"macs", "flops"}),
    ("inspect", "--exits", {"every", "half", "quartiles"}),
    ("calibrate-means", "--arch", {"resnet50"}),
    ("train", "--arch", {"resnet20", "vgg11"}),
    ("train", "--optimizer", {"sgd", "adamw"}),
    ("train", "--schedule", {"cosine", "onecycle", "constant"}),
    ("train", "--eval-split", {"test"}),
    ("train-exits", "--head", {"sdn", "branchy"}),
    ("prune-dataset", "--method", {"eeprune", "el2n", "svp"}),
    ("prune-dataset", "--exit", {"before", "mid", "after"}),
    ("prune-dataset", "--proxy-arch", {"resnet8"}),
    ("import", "--arch", {"resnet18"}),
]


@pytest.mark.parametrize("command, flag, expected", CHOICES, ids=[f"{c} {f}" for c, f, _ in CHOICES])
def test_options_with_choices_complete_them(command: str, flag: str, expected: set[str]) -> None:
    import typer

    from eetool.cli import app

    group = typer.main.get_command(app)
    cmd = group.commands[command]  # type: ignore[attr-defined]
    param = next(p for p in cmd.params if flag in p.opts)
    context = cmd.context_class(cmd)  # typer ships its own click
    offered = {item.value for item in param.shell_complete(context, "")}
    assert expected <= offered, f"{command} {flag} offers {sorted(offered)}"
