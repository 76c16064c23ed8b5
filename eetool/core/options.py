"""Options shared by every subcommand, and the decorator that adds them.

``@eetool_command("kind")`` appends the common options (-q, -v, --format, --no-progress, --seed,
--device, --threads, --config, --debug) to a command's own, applies ``--config FILE`` under the
explicit flags, builds the ``Run`` the command receives, and turns every error into one line on
stderr with a documented exit code.
"""

from __future__ import annotations

import copy
import errno
import functools
import inspect
import json
import math
import os
import sys
import traceback
import typing
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from typer.models import OptionInfo

from eetool.core.architectures import ALL_ARCHS, MAX_CLASSES, MAX_INPUT_CHANNELS, MAX_INPUT_SIDE, ModelOptions
from eetool.core.choices import EXIT_SELECTIONS, OPTIMIZERS, SCHEDULES, SPLITS
from eetool.core.distributed import PeerFailed, World
from eetool.core.errors import EetoolError, ExitCode, UsageError
from eetool.core.interrupts import Interrupted, interrupts_raise
from eetool.core.loading import DataLoading, DataOptions
from eetool.core.reporting import ConsoleReporter
from eetool.core.sources import source_list

if TYPE_CHECKING:
    import torch

    from eetool.core.artifacts import OutputLock

Doc = TypeVar("Doc", bound=Mapping[str, object])  # a command's result, as emit writes it


class Format(str, Enum):
    text = "text"
    json = "json"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Count(str, Enum):
    macs = "macs"
    flops = "flops"


def within(low: float, high: float) -> Callable[[float | None], float | None]:
    """A typer callback that refuses a float option outside [low, high], NaN and infinities included (click's
    own ranges let NaN through to a misleading message)."""
    def check(value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            raise typer.BadParameter(f"{value} is not a number from {low:g} to {high:g}")
        return value

    return check


def prefix_completer(choices: typing.Sequence[str]) -> Callable[[str], list[str]]:
    """Tab completion of an option's value from a fixed list of names."""

    def complete(incomplete: str) -> list[str]:
        return [c for c in choices if c.startswith(incomplete)]

    return complete


def complete_data(incomplete: str) -> list[str]:
    """--data: the source names, with a colon where a path follows."""
    from eetool.core.sources import data_completions

    return prefix_completer(data_completions())(incomplete)


COMMON = "Common options"
INPUT = "Inputs"

# Options that several commands share, declared once.
CheckpointOpt = Annotated[str, typer.Option("--checkpoint", "-c", help="Checkpoint file (.safetensors/.pt) or 'demo'.",
                                            rich_help_panel=INPUT)]
DATA_HELP = f"Dataset NAME[:PATH]: {source_list()}."
DataOpt = Annotated[str, typer.Option("--data", "-d", help=DATA_HELP, rich_help_panel=INPUT,
                                      autocompletion=complete_data)]
SplitOpt = Annotated[str, typer.Option("--split", help="Dataset split: train or test.", rich_help_panel=INPUT,
                                       autocompletion=prefix_completer(SPLITS))]
IndicesOpt = Annotated[str | None, typer.Option("--indices", help="Restrict the dataset to these sample indices "
                                                "(indices artifact or a text file).", rich_help_panel=INPUT)]
ExitsOpt = Annotated[str, typer.Option("--exits", help="Exit points: every, half, quartiles, or module names "
                                       "separated by commas.", rich_help_panel=INPUT,
                                       autocompletion=prefix_completer(EXIT_SELECTIONS))]
# Upper bounds of count options: each far above any run the methods ask for (the thesis: 20 rounds, 10 el2n
# models, 200 epochs), and low enough that what a count sizes up front stays small.
MAX_BATCH = 1 << 16
MAX_EPOCHS = 100_000
MAX_ROUNDS = 1000
MAX_MODELS = 1000
MAX_REPEATS = 1000
MAX_STEPS = 100_000_000
MAX_CLUSTERS = 4096
MAX_POOL_SIZE = 64
CountOpt = Annotated[Count, typer.Option("--count", help="Cost unit: macs, or flops (= 2 x MACs).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, max=MAX_BATCH, help="Samples per batch.")]
GlobalBatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, max=MAX_BATCH,
                                             help="Samples per optimiser step (under torchrun: the global batch, "
                                             "shared out among the processes).")]
OutputOpt = Annotated[str, typer.Option("--output", "-o",
                                        help="Output file ('-' for stdout where the output is YAML).")]
OptionalOutputOpt = Annotated[str | None, typer.Option("--output", "-o", help="Also write the result as a YAML "
                                                       "artifact ('-' for stdout).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output file.")]
# Foreign weights (state dicts that do not record how to build the model): every command that reads a
# checkpoint takes these, declared once and added by ``eetool_command(kind, model_options=True)``.
FOREIGN = "Foreign checkpoints"


def _model_parameters() -> list[inspect.Parameter]:
    def opt(name: str, annotation: object) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)

    return [
        opt("arch", Annotated[str | None, typer.Option(
            "--arch", help="Architecture of weights that do not record it (see `eetool archs`), or "
            "package.module:callable (only ever imported when named here or in --config). train (and "
            "train-exits --from-scratch): the architecture to train from scratch (default resnet20).",
            rich_help_panel=FOREIGN,
            autocompletion=prefix_completer(ALL_ARCHS))]),
        opt("arch_args", Annotated[str | None, typer.Option(
            "--arch-args", help="Builder arguments as YAML/JSON, e.g. '{width: 32}'.", rich_help_panel=FOREIGN)]),
        opt("num_classes", Annotated[int | None, typer.Option(
            "--num-classes", min=1, max=MAX_CLASSES, help="Classes of the weights (default: read from the "
            "final layer's shape).", rich_help_panel=FOREIGN)]),
        opt("input_shape", Annotated[str | None, typer.Option(
            "--input-shape", help="Model input C,H,W, e.g. 1,28,28 (torchvision architectures: 224 x 224 with "
            "the first convolution's channels).", rich_help_panel=FOREIGN)]),
        opt("mean", Annotated[str | None, typer.Option(
            "--mean", help="Normalisation mean per channel, comma-separated.", rich_help_panel=FOREIGN)]),
        opt("std", Annotated[str | None, typer.Option(
            "--std", help="Normalisation std per channel, comma-separated.", rich_help_panel=FOREIGN)]),
    ]


MODEL_NAMES = ("arch", "arch_args", "num_classes", "input_shape", "mean", "std")

# How folder images are decoded and fed (eetool.core.loading): every command that reads data takes these, declared
# once and added by ``eetool_command(kind, data_options=True)``.
DATA_LOADING = "Data loading"
MAX_WORKERS = 256


def _data_parameters() -> list[inspect.Parameter]:
    def opt(name: str, annotation: object, default: object = None) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    return [
        opt("data_loading", Annotated[DataLoading, typer.Option(
            "--data-loading", help="Folder data: decode it all into memory, stream it from disk in batches, or "
            "auto (memory up to 2 GiB decoded). Both give the same results.", rich_help_panel=DATA_LOADING)],
            DataLoading.auto),
        opt("workers", Annotated[int | None, typer.Option(
            "--workers", min=0, max=MAX_WORKERS, help="Processes decoding folder images (0: the main process; "
            "default: the cores less one, at most 8).", rich_help_panel=DATA_LOADING)]),
        opt("resize", Annotated[int | None, typer.Option(
            "--resize", min=1, max=MAX_INPUT_SIDE, help="Folder images: resize the shorter side to N pixels before "
            "the centre crop (default: the checkpoint's; torchvision architectures 256 for a 224 crop).",
            rich_help_panel=DATA_LOADING)]),
        opt("crop", Annotated[str | None, typer.Option(
            "--crop", help="Folder images: centre crop H[,W] (default: the model's input size).",
            rich_help_panel=DATA_LOADING)]),
    ]


DATA_NAMES = ("data_loading", "workers", "resize", "crop")


def _data_options(kwargs: dict[str, Any]) -> DataOptions:
    crop = kwargs.get("crop")
    return DataOptions(loading=kwargs["data_loading"], workers=kwargs.get("workers"), resize=kwargs.get("resize"),
                       crop=parse_crop(crop) if crop is not None else None)


def parse_crop(text: str) -> tuple[int, int]:
    try:
        sides = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        sides = ()
    if len(sides) not in (1, 2) or min(sides) < 1 or max(sides) > MAX_INPUT_SIDE:
        raise UsageError(f"--crop {text!r} is not H[,W] pixels from 1 to {MAX_INPUT_SIDE}",
                         "write e.g. --crop 224 or --crop 224,192")
    return (sides[0], sides[-1])


def _model_options(kwargs: dict[str, Any]) -> ModelOptions:
    """The foreign-checkpoint flags as one typed object, their values checked."""
    std = parse_floats(kwargs.get("std"), "--std")
    if std is not None and (not std or min(std) <= 0):
        raise UsageError(f"--std {kwargs['std']!r} must be positive numbers", "write e.g. --std 0.5,0.5,0.5")
    mean = parse_floats(kwargs.get("mean"), "--mean")
    if mean is not None and not mean:
        raise UsageError("--mean is empty", "write e.g. --mean 0.5,0.5,0.5")
    return ModelOptions(arch=kwargs.get("arch") or None,
                        arch_args=parse_mapping(kwargs.get("arch_args"), "--arch-args"),
                        num_classes=kwargs.get("num_classes"), input_shape=parse_shape(kwargs.get("input_shape")),
                        mean=mean, std=std)


# The training loop's options (train, train-exits, prune-dataset); each command sets its own defaults.
TRAINING = "Training"
OptimizerOpt = Annotated[str, typer.Option("--optimizer", help="sgd (Nesterov momentum) or adamw.",
                                           rich_help_panel=TRAINING, autocompletion=prefix_completer(OPTIMIZERS))]
LrOpt = Annotated[float, typer.Option("--lr", help="Peak learning rate.", rich_help_panel=TRAINING)]
MomentumOpt = Annotated[float, typer.Option("--momentum", help="SGD momentum.", rich_help_panel=TRAINING)]
WeightDecayOpt = Annotated[float, typer.Option("--weight-decay", help="Weight decay.", rich_help_panel=TRAINING)]
ScheduleOpt = Annotated[str, typer.Option("--schedule", help="cosine, onecycle or constant.",
                                          rich_help_panel=TRAINING, autocompletion=prefix_completer(SCHEDULES))]
WarmupEpochsOpt = Annotated[float, typer.Option("--warmup-epochs", help="Linear warm-up length in epochs.",
                                                rich_help_panel=TRAINING)]
AugmentOpt = Annotated[bool, typer.Option("--augment/--no-augment", help="Random crop and flip.",
                                          rich_help_panel=TRAINING)]
LabelSmoothingOpt = Annotated[float, typer.Option("--label-smoothing", help="Label smoothing.",
                                                 rich_help_panel=TRAINING)]
MixupOpt = Annotated[float, typer.Option("--mixup", help="Mixup alpha (0 = off).", rich_help_panel=TRAINING)]
ExitWeightsOpt = Annotated[str | None, typer.Option("--exit-weights", help="Loss weight per exit, comma-separated, "
                                                  "or 'sdn' (0.15, 0.3, ...).", rich_help_panel=TRAINING)]


@dataclass(frozen=True)
class TrainingOptions:
    """The training loop's optimiser settings as one option group, declared once: a command's parameter
    ``training: TrainingOptions = training_options(...)`` becomes these flags, in this order, and the command gets
    their values back as one object. Every command offers --optimizer, --lr, --weight-decay, --schedule and
    --augment; the others only where named (None where not offered)."""

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float | None = None
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float | None = None
    label_smoothing: float | None = None
    mixup: float | None = None
    augment: bool = True

    def given(self, *leave_out: str) -> dict[str, Any]:
        """The offered options as keyword arguments (of a request whose fields bear their names), less
        ``leave_out``."""
        return {k: v for k, v in vars(self).items() if v is not None and k not in leave_out}


TRAINING_FLAGS: dict[str, Any] = {"optimizer": OptimizerOpt, "lr": LrOpt, "momentum": MomentumOpt,
                                  "weight_decay": WeightDecayOpt, "schedule": ScheduleOpt,
                                  "warmup_epochs": WarmupEpochsOpt, "label_smoothing": LabelSmoothingOpt,
                                  "mixup": MixupOpt, "augment": AugmentOpt}
OPTIONAL_TRAINING = ("momentum", "warmup_epochs", "label_smoothing", "mixup")
_TRAINING_DEFAULTS = {"momentum": 0.9, "warmup_epochs": 1.0, "label_smoothing": 0.0, "mixup": 0.0}


def training_options(*offered: str, **defaults: Any) -> TrainingOptions:
    """The training option group of a command: ``offered`` names the optional flags it takes (of
    OPTIONAL_TRAINING), ``defaults`` its own defaults where they differ from the training loop's."""
    unknown = set(offered) - set(OPTIONAL_TRAINING) or set(defaults) - set(TRAINING_FLAGS)
    if unknown:
        raise TypeError(f"not training options: {sorted(unknown)}")
    return TrainingOptions(**{**{k: _TRAINING_DEFAULTS[k] for k in offered}, **defaults})


def _group_parameters(p: inspect.Parameter) -> list[inspect.Parameter]:
    """An option group's parameter as the parameters of its flags (a plain parameter as itself)."""
    if not isinstance(p.default, TrainingOptions):
        return [p]
    return [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v, annotation=TRAINING_FLAGS[k])
            for k, v in vars(p.default).items() if v is not None]


@dataclass
class Run:
    """What every command gets: the common options, a reporter on stderr, and the resolved arguments."""

    command: str
    schema: str
    quiet: bool = False
    verbose: bool = False
    format: Enum = Format.text  # a command's own formats where it has them (eetool_command's ``formats``)
    progress: bool = True
    seed: int = 0
    device_name: Device = Device.auto
    threads: int | None = None
    debug: bool = False
    config: Path | None = None
    args: dict[str, Any] = field(default_factory=dict)
    resumable: str = ""  # set by a command that saves resumable state: how to continue after Ctrl-C
    resume_state: str = ""  # where that state goes: the hint is given only once something was saved there
    model_options: ModelOptions = field(default_factory=ModelOptions)  # for checkpoints that do not record them
    data_options: DataOptions = field(default_factory=DataOptions)  # how folder data is decoded and fed
    distributed: bool = False  # the command runs under torchrun (eetool.core.distributed); others refuse to
    world: World = field(default_factory=World.from_env)
    joined: bool = False  # this process has joined torchrun's process group
    reporter: ConsoleReporter = field(init=False)
    locks: list[OutputLock] = field(default_factory=list)  # of the outputs, held until the command ends
    written: list[str] = field(default_factory=list)  # outputs already complete: an interrupt now names them

    def __post_init__(self) -> None:
        # Under torchrun only rank 0 shows progress, logs and warnings: the others would repeat them.
        self.reporter = ConsoleReporter(quiet=self.quiet or not self.world.main, verbose=self.verbose,
                                        progress=self.progress and self.world.main)

    @property
    def json(self) -> bool:
        return self.format == Format.json

    def torch(self) -> torch.device:
        """Import torch, apply --seed and --threads, and return the --device; under torchrun, join its
        process group on this rank's device."""
        import torch

        torch.manual_seed(self.seed)
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.world.distributed:
            from eetool.core.distributed import join

            device = join(self.world, self.device_name.value)
            self.joined = True
            return device
        if self.device_name == Device.cuda and not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but no CUDA device is available", "use --device cpu or auto")
        if self.device_name == Device.auto:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device_name.value)

    def check_output(self, output: str, *, force: bool, inputs: tuple[str | None, ...] = (), flag: str = "-o",
                     binary: bool = False) -> None:
        """Refuse an output that exists (without --force), is an input (--config included) or cannot be written,
        a ``binary`` (safetensors) output on stdout, and YAML on stdout (``-o -``) that would mix with --format json.
        Then lock it (``OUTPUT.lock``) until the command ends, so that no other run writes it meanwhile."""
        from eetool.core.artifacts import STDOUT, OutputLock, check_output

        if output == STDOUT and binary:
            raise UsageError(f"{flag} - would put a binary safetensors file on stdout, which is for text and YAML",
                             f"give a file name, e.g. {flag} out.safetensors")
        if output == STDOUT and self.json:
            raise UsageError("-o - and --format json both ask for stdout", "drop one, or write the YAML to a file")
        check_output(output, force=force, inputs=(*inputs, str(self.config) if self.config else None))
        if output != STDOUT and self.world.main:  # under torchrun rank 0 writes, and locks, alone
            self.locks.append(OutputLock(output))

    def wrote(self, *paths: str) -> None:
        """Say on stderr that ``paths`` are written, and remember them: an interrupt after this names them as
        complete, where before it would say that nothing was written."""
        self.written.extend(paths)
        self.reporter.log(f"wrote {', '.join(paths)}")

    def release(self) -> None:
        """Release the outputs' locks (the wrapper calls it however the command ends)."""
        while self.locks:
            self.locks.pop().release()

    def emit(self, doc: Doc, text: Callable[[Doc], str]) -> None:
        """Write the command's result to stdout: JSON led by its schema, or text made by ``text``.
        Under torchrun rank 0 alone writes it."""
        if not self.world.main:
            return
        if self.json:
            # Strict JSON: NaN and infinities (a diverged loss, an empty class) become null.
            body = json.dumps(_finite({"schema": self.schema, **doc}), indent=2, default=str, allow_nan=False)
            sys.stdout.write(body + "\n")
        else:
            out = text(doc)
            sys.stdout.write(out if out.endswith("\n") else out + "\n")
        sys.stdout.flush()


def state_saved(path: str) -> bool:
    """Whether a resume-state file, or a state folder with a file besides eetool's marker, exists at ``path``."""
    from eetool.core.owned_folders import MARKER

    if not path:
        return False
    p = Path(path)
    return p.is_file() or p.is_dir() and any(f.name != MARKER for f in p.iterdir())


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# torch seeds are 64-bit; half the range leaves room for the seeds derived from --seed (one per el2n model).
MAX_SEED = 2**63 - 1
# More threads than any machine has cores only slows torch down (and very many fail to start).
MAX_THREADS = 4096


def _common_parameters(formats: type[Enum] = Format) -> list[inspect.Parameter]:
    """``formats``: the values --format takes, the first its default (text or json, unless a command writes
    records of its own, as predict's JSON Lines or CSV)."""
    first = next(iter(formats))
    format_help = ("Output on stdout: text table or JSON." if formats is Format
                   else f"Output on stdout: {', '.join(f.value for f in formats)}.")

    def opt(name: str, annotation: object, default: object) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    return [
        opt("quiet", Annotated[bool, typer.Option("--quiet", "-q", help="Only data on stdout and errors on stderr.",
                                                  rich_help_panel=COMMON)], False),
        opt("verbose", Annotated[bool, typer.Option("--verbose", "-v", help="More detail on stderr.",
                                                    rich_help_panel=COMMON)], False),
        opt("format", Annotated[formats, typer.Option("--format", help=format_help,  # type: ignore[valid-type]
                                                      rich_help_panel=COMMON)], first),
        opt("no_progress", Annotated[bool, typer.Option("--no-progress", help="Hide progress bars (also hidden when "
                                                        "stderr is not a terminal).", rich_help_panel=COMMON)], False),
        opt("seed", Annotated[int, typer.Option("--seed", min=0, max=MAX_SEED, help="Random seed.",
                                                rich_help_panel=COMMON)], 0),
        opt("device", Annotated[Device, typer.Option("--device", help="Where to run: cpu, cuda or auto.",
                                                     rich_help_panel=COMMON)], Device.auto),
        opt("threads", Annotated[int | None, typer.Option("--threads", min=1, max=MAX_THREADS,
                                                          help="CPU threads for torch.", rich_help_panel=COMMON)],
            None),
        opt("config", Annotated[Path | None, typer.Option("--config", help="YAML file of options; explicit flags "
                                                          "override it.", rich_help_panel=COMMON)], None),
        opt("debug", Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.",
                                                  rich_help_panel=COMMON)], False),
    ]


COMMON_NAMES = ("quiet", "verbose", "format", "no_progress", "seed", "device", "threads", "config", "debug")


def eetool_command(kind: str, *, model_options: bool = False, data_options: bool = False, distributed: bool = False,
                   formats: type[Enum] = Format) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Make ``func(run, **options)`` a CLI command whose JSON output has schema ``eetool/<kind>@1``, with the
    foreign-checkpoint options (``model_options``: ``run.model_options``), the data-loading options
    (``data_options``: ``run.data_options``), torchrun allowed (``distributed``) and its --format values
    (``formats``, the first the default). A parameter whose default is a ``training_options(...)`` group
    becomes the group's flags, and ``func`` gets them back as one ``TrainingOptions``."""

    def decorate(func: Callable[..., None]) -> Callable[..., None]:
        sig = inspect.signature(func)
        hints = typing.get_type_hints(func, include_extras=True)  # resolve `from __future__` string annotations
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(n, p.annotation))
               for n, p in sig.parameters.items() if n != "run"]
        groups = {p.name: [g.name for g in _group_parameters(p)] for p in own if isinstance(p.default, TrainingOptions)}
        own = [g for p in own for g in _group_parameters(p)]
        # Required options may come from --config too, so click sees them as optional and they are
        # checked once the config is applied.
        required = {p.name for p in own if p.default is inspect.Parameter.empty and _option_info(p.annotation)}
        own = [_optional(p) if p.name in required else p for p in own]

        @functools.wraps(func)
        def wrapper(**kwargs: Any) -> None:  # option values as click parsed them, one type per option
            ctx: typer.Context = kwargs.pop("ctx")
            debug, quiet = bool(kwargs.get("debug")), bool(kwargs.get("quiet"))
            verbose = debug or bool(kwargs.get("verbose"))
            # Python warnings (torch's among them) are held back: shown as one line each after a
            # success (not with -q), and on failure only with -v or --debug, so that an error stays one line.
            run: Run | None = None
            with warnings.catch_warnings(record=True) as caught:
                try:
                    with interrupts_raise():  # SIGTERM and SIGHUP end the run as Ctrl-C does
                        kwargs = _apply_config(ctx, kwargs)
                        debug, verbose = bool(kwargs["debug"]), bool(kwargs["verbose"] or kwargs["debug"])
                        quiet = bool(kwargs["quiet"])
                        _check_required(ctx, kwargs, required)
                        run = Run(
                            command=ctx.info_name or kind,  # the name the user typed: init-exit-head, not lm-exit-head
                            schema=f"eetool/{kind}@1",
                            quiet=kwargs["quiet"], verbose=kwargs["verbose"], format=kwargs["format"],
                            progress=not kwargs["no_progress"], seed=kwargs["seed"], device_name=kwargs["device"],
                            threads=kwargs["threads"], debug=kwargs["debug"], config=kwargs["config"],
                            distributed=distributed,
                        )
                        own_kwargs = {k: v for k, v in kwargs.items()
                                      if k not in COMMON_NAMES + MODEL_NAMES + DATA_NAMES}
                        run.args = {k: (v.value if isinstance(v, Enum) else v) for k, v in own_kwargs.items()}
                        if model_options:
                            run.model_options = _model_options(kwargs)
                            run.args.update({k: kwargs[k] for k in MODEL_NAMES if kwargs[k] is not None})
                        if data_options:
                            run.data_options = _data_options(kwargs)
                            # how pixels are made is provenance; how many processes decode them is not
                            run.args.update({k: kwargs[k] for k in ("resize", "crop") if kwargs[k] is not None})
                        run.args["seed"] = run.seed
                        if run.world.distributed and not distributed:
                            raise UsageError(f"{run.command} does not run under torchrun yet",
                                             "run it as one process, without torchrun")
                        for group, members in groups.items():  # provenance keeps the flags; func gets the group
                            own_kwargs[group] = TrainingOptions(**{k: own_kwargs.pop(k) for k in members})
                        try:
                            func(run, **own_kwargs)
                        finally:
                            run.release()
                        if run.joined:
                            from eetool.core.distributed import leave

                            leave()
                except EetoolError as e:
                    # Under torchrun every rank meets the same arguments, files and checks, before it joins the
                    # others and after: rank 0 alone reports those (every rank still exits with the code). An error
                    # in a rank's own share of the data is that rank's alone to report.
                    quiet_rank = run is not None and not run.world.main and not e.own_share
                    _fail(e.exit_code, "" if quiet_rank else f"error: {e}", debug, caught if verbose else [])
                except KeyboardInterrupt as e:
                    if run is not None and run.world.distributed and (
                            isinstance(e, PeerFailed) or isinstance(e, Interrupted) and e.signal_name == "SIGTERM"
                            or not run.world.main):
                        # torchrun ends the other ranks when one fails: that rank's error is the one to read; and
                        # Ctrl-C reaches every rank from the terminal: rank 0 alone says so
                        _fail(ExitCode.INTERRUPTED, "", debug)
                    by = f" by {e.signal_name}" if isinstance(e, Interrupted) and e.signal_name != "SIGINT" else ""
                    if run is not None and run.written:  # the outputs are complete; what came after them is not
                        _fail(ExitCode.INTERRUPTED, f"interrupted{by} after writing {', '.join(run.written)}, which "
                              f"{'is' if len(run.written) == 1 else 'are'} complete and kept; nothing after it was "
                              "written (partial files are removed)", debug, caught if verbose else [])
                    resume = f" (hint: {run.resumable})" if run is not None and run.resumable and \
                        state_saved(run.resume_state) else ""
                    _fail(ExitCode.INTERRUPTED, f"interrupted{by}: no output was written (partial files are "
                          f"removed){resume}", debug, caught if verbose else [])
                except (typer.Exit, typer.Abort):
                    raise
                except OSError as e:
                    if e.errno == errno.EPIPE:  # BrokenPipeError: stdout's reader has gone
                        stdout_gone()
                    _internal(e, debug, caught if verbose else [])
                except Exception as e:  # a bug: one line, unless --debug asks for the traceback
                    _internal(e, debug, caught if verbose else [])
            if not quiet and (run is None or run.world.main):
                _show_warnings(caught)

        ctx_param = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        params = [ctx_param, *own, *(_model_parameters() if model_options else []),
                  *(_data_parameters() if data_options else []), *_common_parameters(formats)]
        wrapper.__signature__ = sig.replace(parameters=params, return_annotation=None)  # type: ignore[attr-defined]
        # typer reads resolved annotations of the new signature, not func's string annotations.
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # type: ignore[attr-defined]
        return wrapper

    return decorate


def _option_info(annotation: object) -> OptionInfo | None:
    for meta in getattr(annotation, "__metadata__", ()):
        if isinstance(meta, OptionInfo):
            return meta
    return None


def _optional(p: inspect.Parameter) -> inspect.Parameter:
    """The same option, without a default for click, and saying in its help that it is required."""
    info = copy.copy(_option_info(p.annotation))
    assert info is not None
    info.help = f"{info.help or ''} Required (on the command line or in --config).".strip()
    base = typing.get_args(p.annotation)[0]
    return p.replace(annotation=Annotated[base | None, info], default=None)


def _check_required(ctx: typer.Context, kwargs: dict[str, Any], required: set[str]) -> None:
    for param in ctx.command.params:
        if param.name in required and kwargs.get(param.name) is None:
            flag = max(param.opts, key=len)
            raise UsageError(f"missing option {flag}", f"give {flag} VALUE, or '{param.name.replace('_', '-')}:' "
                             "in the --config file")


def _show_warnings(caught: list[warnings.WarningMessage]) -> None:
    seen = set()
    for w in caught:
        line = f"warning: {w.category.__name__}: {' '.join(str(w.message).split())}"
        if line not in seen:
            seen.add(line)
            sys.stderr.write(line + "\n")


def _fail(code: ExitCode, line: str, debug: bool, caught: list[warnings.WarningMessage] | None = None) -> None:
    _show_warnings(caught or [])
    if debug:
        traceback.print_exc()
    if line:
        sys.stderr.write(line.replace("\n", " ") + "\n")
    sys.stderr.flush()
    raise typer.Exit(int(code))


def _internal(e: Exception, debug: bool, caught: list[warnings.WarningMessage]) -> None:
    first = str(e).splitlines()[0] if str(e).strip() else ""
    _fail(ExitCode.INTERNAL, f"internal error: {type(e).__name__}: {first} "
          "(hint: rerun with --debug and report the traceback)", debug, caught)


def stdout_gone() -> None:
    """The reader of stdout has gone (``| head``, ``| true``): end quietly with exit 141, as a tool that SIGPIPE
    ends does. stdout is pointed at /dev/null so that Python's flush at exit does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no stdout to point anywhere
        pass
    raise typer.Exit(int(ExitCode.BROKEN_PIPE))


def _apply_config(ctx: typer.Context, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Fill options that were not given on the command line from ``--config FILE``."""
    path = kwargs.get("config")
    if path is None:
        return kwargs
    import yaml

    from eetool.core.artifacts import load_yaml, read_yaml_text
    from eetool.core.errors import InputError

    try:
        loaded = load_yaml(read_yaml_text(path), f"config {path}")
    except OSError as e:
        raise InputError(f"cannot read config {path}: {e.strerror}", "check the path") from None
    except (yaml.YAMLError, UnicodeDecodeError):
        raise InputError(f"config {path} is not valid YAML", "check its syntax") from None
    if loaded is None:
        return kwargs
    if not isinstance(loaded, dict):
        raise UsageError(f"config {path} must be a mapping of option names to values", "write e.g. 'epochs: 10'")
    params = {p.name: p for p in ctx.command.params if p.name}
    out = dict(kwargs)
    for raw_key, value in loaded.items():
        key = str(raw_key).replace("-", "_")
        if key not in params or key == "config":
            known = ", ".join(sorted(k.replace("_", "-") for k in params if k != "config"))
            raise UsageError(f"unknown key {raw_key!r} in config {path}", f"known keys: {known}")
        source = ctx.get_parameter_source(key)
        if source is not None and source.name == "COMMANDLINE":
            continue
        repeatable = bool(getattr(params[key], "multiple", False))  # e.g. budget: [0.25, 0.5]
        if isinstance(value, (list, tuple)) and not repeatable:  # e.g. mean: [0.5, 0.5] or input-shape: [1, 28, 28]
            value = ",".join(str(v) for v in value)
        elif repeatable and not isinstance(value, (list, tuple)):
            value = [value]
        elif isinstance(value, dict):  # e.g. arch-args: {width: 32}
            value = json.dumps(value)
        if isinstance(value, bool) and not getattr(params[key], "is_flag", False):  # click would take true as 1
            raise UsageError(f"bad value {value!r} for {raw_key!r} in config {path}: not a switch",
                             "fix the config")
        try:
            out[key] = params[key].process_value(ctx, value)  # the type conversion and checks of the flag
        except Exception as e:  # click's BadParameter and friends
            reason = e.format_message() if hasattr(e, "format_message") else str(e)
            raise UsageError(f"bad value {value!r} for {raw_key!r} in config {path}: {reason}",
                             "fix the config") from None
    return out


def parse_floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = [math.nan]
    if not all(math.isfinite(v) for v in values):
        raise UsageError(f"{flag} {text!r} is not a comma-separated list of finite numbers",
                         f"write e.g. {flag} 0.5,0.5,0.5")
    return values


def parse_shape(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise UsageError(f"--input-shape {text!r} is not C,H,W", "write e.g. --input-shape 3,224,224")
    if dims[0] > MAX_INPUT_CHANNELS or max(dims[1:]) > MAX_INPUT_SIDE:
        raise UsageError(f"--input-shape {text!r} is beyond eetool's limits ({MAX_INPUT_CHANNELS} channels, "
                         f"{MAX_INPUT_SIDE} pixels a side)", "give the size the model was trained on")
    return dims  # type: ignore[return-value]


def parse_mapping(text: str | None, flag: str) -> dict[str, Any]:
    """A YAML/JSON mapping given on the command line (JSON is YAML)."""
    if not text:
        return {}
    import yaml

    from eetool.core.artifacts import load_yaml

    try:
        value = load_yaml(text, flag, UsageError)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise UsageError(f"{flag} {text!r} is not a YAML/JSON mapping", f"write e.g. {flag} '{{width: 32}}'")
    return value

# Inference passes (evaluate, predict): the network as saved, or a copy with its batch norms folded.
FoldBatchNormOpt = Annotated[bool, typer.Option(
    "--fold-batch-norm/--no-fold-batch-norm", help="Classifiers: run a copy of the network with each batch norm "
    "folded into the convolution before it (the same predictions up to float rounding, less time); "
    "--no-fold-batch-norm runs it as saved. Segmentation networks always run folded.")]

# Artifacts made by earlier commands, passed by flags named after their kind.
MeansOpt = Annotated[str, typer.Option("--means", help="Class-means artifact from `eetool calibrate-means`.",
                                       rich_help_panel=INPUT)]
ThresholdsOpt = Annotated[str | None, typer.Option("--thresholds", help="Thresholds artifact from "
                                                   "`eetool fit-thresholds`.", rich_help_panel=INPUT)]
