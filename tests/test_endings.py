"""How runs end: signals, broken pipes, outputs written as a set, output locks, and numbers that are not numbers.

Every ending is clean: the documented exit code, one line on stderr, and no temp file, lock file or
partial output left behind.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import eetool.core.artifacts
from eetool.classification.e2cm import calibrate
from eetool.core.artifacts import STDOUT, OutputLock, Provenance, atomic_write, output_set, write_tensors, write_yaml
from eetool.core.checkpoint import ModelSpec
from eetool.core.datasets import Preprocess, load_dataset
from eetool.core.errors import ExitCode, InputError, OutputError, UsageError
from eetool.core.exits import build_exit_model
from eetool.core.interrupts import SIGNALS, Interrupted, deferred, interrupts_raise, own_process
from eetool.core.options import Run
from eetool.core.training_loop import TrainConfig, fit
from tests.cli_helpers import invoke, ok, one_error_line

REPO = Path(__file__).resolve().parent.parent


def leftovers(folder: Path) -> list[str]:
    """Temp and lock files: what an unclean ending leaves."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".lock")))


def with_signal(real: Callable[..., Any], signum: int = signal.SIGTERM, *, after: bool = False) -> Callable[..., Any]:
    """``real``, with the signal sent to this process just before it runs, or just ``after`` it has returned
    (then the handler runs before the caller sees the result: a temp file exists that the caller cannot name)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if not after:
            os.kill(os.getpid(), signum)
        result = real(*args, **kwargs)
        if after:
            os.kill(os.getpid(), signum)
        return result

    return call


# ---------------------------------------------------------------------------------------------
# atomic_write under signals (in this process: the handler the CLI installs, and a signal sent to self)


@pytest.mark.parametrize("where", ["mkstemp", "fsync", "chmod"])
def test_a_signal_during_an_atomic_write_leaves_no_temp_file(where: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside mkstemp (the temp file exists but its name is not yet known) and between the write and the rename."""
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    artifacts = eetool.core.artifacts
    module = {"mkstemp": artifacts.tempfile, "fsync": artifacts.os, "chmod": artifacts.os}[where]
    monkeypatch.setattr(module, where, with_signal(getattr(module, where), after=where == "mkstemp"))
    with interrupts_raise(), pytest.raises(Interrupted) as caught:
        atomic_write(str(target), b"new" * 100_000)
    assert caught.value.signal_name == "SIGTERM"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    assert target.read_bytes() == b"old"


def test_a_signal_during_the_rename_lets_it_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rename is not cut off: the interrupt comes after it, with the whole new file in place."""
    target = tmp_path / "out.bin"
    monkeypatch.setattr(eetool.core.artifacts.os, "replace", with_signal(os.replace, signal.SIGHUP))
    with interrupts_raise(), pytest.raises(Interrupted, match="SIGHUP"):
        atomic_write(str(target), b"new" * 100_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    assert target.read_bytes() == b"new" * 100_000


def test_handlers_are_restored_and_deferred_signals_are_raised_once() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with interrupts_raise():
        assert signal.getsignal(signal.SIGTERM) is not before
        with pytest.raises(Interrupted):
            with deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)  # the handler runs here, and holds the signal
                reached_end_of_section = True
        assert reached_end_of_section
        with deferred():  # the held signal was raised once, not again
            pass
    assert signal.getsignal(signal.SIGTERM) is before


def test_in_eetools_own_process_the_signals_are_ignored_once_a_run_has_ended() -> None:
    """The CLI's main: after the run its outcome stands; a signal then would kill the process (129 for SIGHUP)."""
    before = {s: signal.getsignal(s) for s in SIGNALS}
    try:
        with own_process():
            with interrupts_raise():
                pass
            assert all(signal.getsignal(s) == signal.SIG_IGN for s in SIGNALS)
            os.kill(os.getpid(), signal.SIGHUP)  # dropped: this test goes on
            time.sleep(0.01)
    finally:
        for s, old in before.items():
            signal.signal(s, old)


def test_a_signal_after_the_output_is_written_names_it_as_complete(tiny_checkpoint: str, tiny_data: str,
                                                                   workdir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Between "wrote ..." and the end of the report: not "no output was written", which would be false."""
    wrote = Run.wrote
    monkeypatch.setattr(Run, "wrote", with_signal(wrote, signal.SIGHUP, after=True))
    result = invoke("calibrate-means", "-c", tiny_checkpoint, "-d", tiny_data, "-o", "m.safetensors")
    assert result.exit_code == ExitCode.INTERRUPTED
    assert result.stderr.splitlines() == [
        "wrote m.safetensors",
        "interrupted by SIGHUP after writing m.safetensors, which is complete and kept; nothing after it was "
        "written (partial files are removed)"]
    assert result.stdout == ""
    monkeypatch.setattr(Run, "wrote", wrote)
    ok(invoke("fit-thresholds", "--means", "m.safetensors", "-o", "t.yaml", "--budget", 0.5, "-q"))  # whole, usable
    assert leftovers(workdir) == []


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT], ids=["SIGHUP", "SIGTERM", "SIGINT"])
def test_a_signal_once_the_run_has_ended_leaves_its_exit_code(signum: int, tiny_checkpoint: str, tiny_data: str,
                                                              tmp_path: Path) -> None:
    """The signal comes at exit (an atexit hook sends it): the run had finished, so it still exits 0, not 129."""
    script = ("import atexit, os, signal, sys; from eetool.cli import main; "
              f"atexit.register(lambda: (os.kill(os.getpid(), {int(signum)}), sys.stderr.write('sent\\n'))); "
              "sys.argv[0] = 'eetool'; main()")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script, "calibrate-means", "-c", tiny_checkpoint, "-d", tiny_data,
                           "-o", "m.safetensors", "--no-progress"], cwd=tmp_path, env=env, capture_output=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr.decode().splitlines() == ["wrote m.safetensors", "sent"]
    assert done.stdout.decode().startswith("class means")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_write_tensors_refuses_stdout() -> None:
    with pytest.raises(OutputError, match="binary"):
        write_tensors(STDOUT, {"x": torch.zeros(2)}, Provenance(kind="indices"))


# ---------------------------------------------------------------------------------------------
# Outputs written as a set


def test_a_set_appears_together(tmp_path: Path) -> None:
    paths = [str(tmp_path / n) for n in ("kept.safetensors", "summary.yaml")]
    with output_set(paths) as temps:
        write_tensors(temps[0], {"indices": torch.arange(3)}, Provenance(kind="indices"))
        write_yaml(temps[1], {"kept": 3}, Provenance(kind="indices"))
        assert not any(Path(p).exists() for p in paths)  # nothing is visible before the end
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.safetensors", "summary.yaml"]
    assert "kept: 3" in Path(paths[1]).read_text()


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), Interrupted("SIGTERM")])
def test_a_set_that_fails_half_way_leaves_nothing(failure: BaseException, tmp_path: Path) -> None:
    paths = [str(tmp_path / n) for n in ("kept.safetensors", "pruned.safetensors", "summary.yaml")]
    with pytest.raises((OutputError, Interrupted)):
        with output_set(paths) as temps:
            write_tensors(temps[0], {"indices": torch.arange(3)}, Provenance(kind="indices"))
            raise failure
    assert list(tmp_path.iterdir()) == []


def test_prune_dataset_writes_kept_pruned_and_summary_together(tiny_checkpoint: str, tiny_data: str, workdir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The summary (the last member) fails: neither indices file appears, and nothing else is left."""
    import eetool.core.artifacts as artifacts

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    real = artifacts.write_yaml
    monkeypatch.setattr(artifacts, "write_yaml", fail)
    args = ["prune-dataset", "-c", tiny_checkpoint, "-d", tiny_data, "-m", "random", "--ratio", "0.5",
            "-o", "kept.safetensors", "--pruned-output", "pruned.safetensors"]
    assert "No space left" in one_error_line(invoke(*args), ExitCode.OUTPUT)
    assert list(workdir.iterdir()) == []
    monkeypatch.setattr(artifacts, "write_yaml", real)
    ok(invoke(*args))
    assert sorted(p.name for p in workdir.iterdir()) == ["kept.safetensors", "kept.yaml", "pruned.safetensors"]


# ---------------------------------------------------------------------------------------------
# Output locks


def test_a_second_run_on_a_locked_output_is_refused(tiny_checkpoint: str, tiny_data: str, workdir: Path) -> None:
    lock = OutputLock("means.safetensors")  # another run writing the same output
    try:
        result = invoke("calibrate-means", "-c", tiny_checkpoint, "-d", tiny_data, "-o", "means.safetensors")
        line = one_error_line(result, ExitCode.OUTPUT)
        assert f"being written by another eetool run (pid {os.getpid()})" in line
        assert sorted(p.name for p in workdir.iterdir()) == ["means.safetensors.lock"]
    finally:
        lock.release()
    assert list(workdir.iterdir()) == []


def test_a_lock_is_refused_while_held_and_free_after(tmp_path: Path) -> None:
    out = str(tmp_path / "kept.safetensors")
    first = OutputLock(out)
    with pytest.raises(OutputError, match="another eetool run"):
        OutputLock(out)
    first.release()
    OutputLock(out).release()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Numbers that are not numbers


def test_training_that_diverges_stops_without_an_output(tiny_data: str, workdir: Path) -> None:
    result = invoke("train", "-d", tiny_data, "-o", "m.safetensors", "--arch-args", "{width: 4}", "--epochs", "2",
                    "--lr", "1e30", "--warmup-epochs", "0", "--no-augment", "-q")
    assert "training diverged" in one_error_line(result, ExitCode.USAGE)
    assert [p.name for p in workdir.iterdir() if p.name != "m.safetensors.resume.pt"] == []


def test_fit_refuses_non_finite_weights_that_a_finite_loss_hides(tiny_data: str) -> None:
    """The last step of an epoch can overflow the weights while its loss was still finite."""
    data = load_dataset(tiny_data, "train")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    cfg = TrainConfig(epochs=1, batch_size=len(data), lr=1e38, momentum=0, weight_decay=0, warmup_epochs=0,
                      augment=False)  # one step: its loss is finite, the weights it leaves are not
    inputs_in_hundreds = Preprocess((1, 28, 28), [0.5], [1e-3])  # gradients of 10-100: lr x gradient overflows
    with pytest.raises(UsageError, match="weights are not finite after epoch 1"):
        fit(model, data, inputs_in_hundreds, cfg)


def test_calibrating_a_model_with_nan_weights_is_refused(tiny_spec: ModelSpec, tiny_data: str) -> None:
    model = tiny_spec.build().eval()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "layer2" in n and p.dim() == 4)[0, 0, 0, 0] = float("nan")
    em = build_exit_model(model, "every")
    data = load_dataset(tiny_data, "test")
    with pytest.raises(InputError, match="class means at exit layer2.0 are NaN or infinite") as caught:
        calibrate(em, data, Preprocess(tiny_spec.input_shape, tiny_spec.mean, tiny_spec.std), 10)
    assert "checkpoint's weights" in str(caught.value.hint)


def test_calibrating_a_model_whose_head_alone_is_nan_is_refused(tiny_spec: ModelSpec, tiny_data: str) -> None:
    """Every exit's features are finite; the model's own outputs are not."""
    model = tiny_spec.build().eval()
    last = list(model.parameters())[-1]
    with torch.no_grad():
        last[0] = float("inf")
    em = build_exit_model(model, "every")
    with pytest.raises(InputError, match="model's outputs are NaN or infinite"):
        calibrate(em, load_dataset(tiny_data, "test"), Preprocess(tiny_spec.input_shape, tiny_spec.mean,
                                                                  tiny_spec.std), 10)


# ---------------------------------------------------------------------------------------------
# Real processes: signals from outside, a reader that goes away, a closed stdout


def spawn(*args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "eetool", *args], env=env, stderr=subprocess.PIPE, **kwargs)


def stderr_line(proc: subprocess.Popen[bytes], timeout: float = 60) -> str:
    assert proc.stderr is not None
    ready, _, _ = select.select([proc.stderr], [], [], timeout)
    assert ready, "no line on stderr in time"
    return proc.stderr.readline().decode()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_end_training_as_ctrl_c_does(signum: int, tiny_data: str, tmp_path: Path) -> None:
    proc = spawn("train", "-d", tiny_data, "-o", "m.safetensors", "--arch-args", "{width: 4}", "--epochs", "10000",
                  "--no-progress", cwd=tmp_path, stdout=subprocess.PIPE)
    try:
        assert stderr_line(proc).startswith("training resnet20")
        deadline = time.monotonic() + 120
        while not (tmp_path / "m.safetensors.resume.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # until an epoch has finished and its state is saved: the hint names it
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == ExitCode.INTERRUPTED
    lines = [line for line in err.decode().splitlines() if not line.startswith("epoch ")]  # epochs that finished
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"interrupted by {signal.Signals(signum).name}: no output was written")
    assert "rerun with --resume" in lines[0]
    assert out == b""
    assert [p.name for p in tmp_path.iterdir() if p.name != "m.safetensors.resume.pt"] == []


def test_a_reader_that_goes_away_is_not_an_internal_error(tmp_path: Path) -> None:
    """As `eetool archs | true`: every command writes stdout through the same wrapper (archs starts fast)."""
    proc = spawn("archs", "--format", "json", cwd=tmp_path, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()  # `| true`: the reader is gone before anything is written
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.BROKEN_PIPE
    assert err == b""


def test_a_closed_stdout_is_not_an_internal_error(tmp_path: Path) -> None:
    """As `eetool archs >&-`: what would go to stdout is dropped, as with > /dev/null."""
    proc = spawn("archs", cwd=tmp_path, stdout=subprocess.DEVNULL,
                  preexec_fn=lambda: os.close(1))  # `>&-`
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert err == b""
    assert list(tmp_path.iterdir()) == []
