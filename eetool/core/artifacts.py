"""The one module that writes and reads eetool's artifacts: safetensors and YAML with their provenance, atomic
writes and output sets, and the checks a reader makes (kind, schema, provenance).

Formats: docs/artifacts.md
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from eetool import __version__
from eetool.core.distributed import World
from eetool.core.errors import EetoolError, InputError, OutputError, ProvenanceError
from eetool.core.interrupts import deferred

if TYPE_CHECKING:
    import torch

# Schema version of each artifact kind, and the command that makes it (named in mismatch errors).
KINDS: dict[str, tuple[int, str]] = {
    "checkpoint": (1, "eetool train"),
    "indices": (1, "eetool prune-dataset"),
    "evaluation": (1, "eetool evaluate"),
    "class-means": (1, "eetool calibrate-means"),
    "thresholds": (1, "eetool fit-thresholds"),
    "segmentation-thresholds": (1, "eetool fit-thresholds --method cbt|cbt-ns|adp-c"),
    "segmentation-class-statistics": (1, "eetool calibrate-means -c SEGMENTATION_CHECKPOINT"),
    "exit-heads": (1, "eetool train-exits"),
    "masks": (1, "eetool prune-weights"),
    "weight-pruning": (1, "eetool prune-weights"),
    "lm-exit-head": (1, "eetool init-exit-head"),
    "lm-evaluation": (1, "eetool evaluate-lm"),
    "lm-training": (1, "eetool train-exit-head --report"),
}

STDOUT = "-"
Source = TypeVar("Source")  # what a provenance is parsed from: safetensors metadata or a YAML mapping

# The safetensors metadata key of an artifact's exits. Files written by the releases whose layout change renamed
# it by accident carry RENAMED_EXITS_KEY; they are still read.
EXITS_KEY = "eetool.exits"
RENAMED_EXITS_KEY = "eetool.core.exits"


@dataclass
class Provenance:
    kind: str
    checkpoint_sha256: str = ""
    exits: list[str] = field(default_factory=list)
    dataset: str = ""
    args: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)  # artifact kind -> sha256 of the artifact it was made from
    schema: int = 0
    version: str = __version__
    model_sha256: str = ""  # the checkpoint's spec and weights (see eetool.core.checkpoint.model_sha256)
    processes: int = field(default_factory=lambda: World.from_env().size)  # that made it (torchrun's, else 1)

    def __post_init__(self) -> None:
        if not self.schema:
            self.schema = KINDS[self.kind][0]

    def to_metadata(self) -> dict[str, str]:
        """safetensors metadata: strings only."""
        return {
            "format": "pt",
            "eetool.version": self.version,
            "eetool.kind": self.kind,
            "eetool.schema": str(self.schema),
            "eetool.checkpoint_sha256": self.checkpoint_sha256,
            "eetool.model_sha256": self.model_sha256,
            EXITS_KEY: json.dumps(self.exits),
            "eetool.dataset": self.dataset,
            "eetool.args": json.dumps(self.args, sort_keys=True, default=str),
            "eetool.inputs": json.dumps(self.inputs, sort_keys=True),
            "eetool.processes": str(self.processes),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> Provenance:
        return cls(
            kind=meta["eetool.kind"],
            checkpoint_sha256=meta.get("eetool.checkpoint_sha256", ""),
            model_sha256=meta.get("eetool.model_sha256", ""),
            exits=json.loads(meta.get(EXITS_KEY, meta.get(RENAMED_EXITS_KEY, "[]"))),
            dataset=meta.get("eetool.dataset", ""),
            args=json.loads(meta.get("eetool.args", "{}")),
            inputs=json.loads(meta.get("eetool.inputs", "{}")),
            schema=int(meta["eetool.schema"]),
            version=meta.get("eetool.version", ""),
            processes=int(meta.get("eetool.processes", "1")),  # artifacts from before it was recorded: one
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "eetool_version": self.version,
            "kind": self.kind,
            "schema": self.schema,
            "checkpoint_sha256": self.checkpoint_sha256,
            "model_sha256": self.model_sha256,
            "exits": list(self.exits),
            "dataset": self.dataset,
            "args": self.args,
            "inputs": dict(self.inputs),
            "processes": self.processes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Provenance:
        return cls(
            kind=d["kind"],
            checkpoint_sha256=d.get("checkpoint_sha256", ""),
            model_sha256=d.get("model_sha256", ""),
            exits=list(d.get("exits", [])),
            dataset=d.get("dataset", ""),
            args=dict(d.get("args", {})),
            inputs=dict(d.get("inputs", {})),
            schema=int(d["schema"]),
            version=d.get("eetool_version", ""),
            processes=int(d.get("processes", 1)),
        )


@dataclass(frozen=True)
class CheckpointIdentity:
    """How artifacts name the checkpoint they were made from. ``sha256`` is the file's (with the options that
    built foreign weights); ``model_sha256`` is of the spec and weights alone, so that a foreign file and
    its `eetool import` copy accept each other's artifacts."""

    sha256: str
    model_sha256: str = ""

    def made(self, prov: Provenance) -> bool:
        return prov.checkpoint_sha256 == self.sha256 or bool(self.model_sha256 and
                                                             prov.model_sha256 == self.model_sha256)


class ArtifactFile:
    """What every artifact class shares: the provenance it carries and the file it was loaded from (for
    messages), checked against what a run uses by ``verify``. Each class declares both as its own fields."""

    provenance: Provenance
    source: str

    def verify(self, *, checkpoint: CheckpointIdentity | None = None, exits: list[str] | None = None,
               dataset: str | None = None, inputs: dict[str, str] | None = None) -> None:
        """Refuse the artifact where it was made from another checkpoint, exits, dataset or input artifacts."""
        verify(self.source, self.provenance, checkpoint=checkpoint, exits=exits, dataset=dataset, inputs=inputs)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The file's sha256; a missing or unreadable input is the usual one-line error, whoever hashes it first."""
    h = hashlib.sha256()
    with open(require_file(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Output paths and atomic writes


def check_output(path: str, *, force: bool, inputs: tuple[str | None, ...] = ()) -> None:
    """Refuse an output before any work is done.

    It exists (without --force), is an input, is a folder, or its folder is missing or unwritable.
    """
    if path == STDOUT:
        return
    out = Path(path)
    from eetool.core.sources import demo_path

    if out.resolve().is_relative_to(demo_path("").resolve()):  # an input of every demo run, named or not
        raise OutputError(f"output {path} is inside eetool's embedded demo folder", "write the result to another file")
    for inp in inputs:
        if inp and inp != STDOUT and Path(inp).exists() and out.exists() and out.resolve() == Path(inp).resolve():
            raise OutputError(f"output {path} is also an input", "write the result to another file")
        if inp and inp != STDOUT and out.exists() and Path(inp).is_dir() and _read_from(out, Path(inp)):
            raise OutputError(f"output {path} is an image the run reads from the input folder {inp}",
                              "write the result outside that folder")
    if out.is_dir():
        raise OutputError(f"output {path} is a folder", "give a file name")
    if out.exists() and not force:
        raise OutputError(f"output {path} already exists", "pass --force to replace it, or choose another name")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"folder {parent} of output {path} does not exist", "create it first (mkdir -p)")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"folder {parent} of output {path} is not writable", "choose a writable folder")


def _read_from(out: Path, folder: Path) -> bool:
    """Whether ``out`` is one of the images a run reads from an input ``folder`` (a folder dataset, predict's
    folders: every image file under it)."""
    from eetool.core.streaming import IMAGE_SUFFIXES

    return out.suffix.lower() in IMAGE_SUFFIXES and out.resolve().is_relative_to(folder.resolve())


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part.

    An interrupt (Ctrl-C, SIGTERM, SIGHUP) at any point removes the temp file: the two critical moments,
    creating the temp file and renaming it, hold the signal until they are done (``interrupts.deferred``)."""
    if path == STDOUT:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    target = Path(path)
    tmp: str | None = None
    try:
        with deferred():
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
            f = os.fdopen(fd, "wb")
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with deferred():
            os.replace(tmp, target)
            tmp = None
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {path}: {e.strerror}", "check the disk space and permissions") from None
        raise


@contextmanager
def output_set(paths: Sequence[str]) -> Iterator[list[str]]:
    """Outputs that appear together or not at all: yields one temp path per output for the block to write; renamed
    onto the outputs when it ends normally, removed when it fails or is interrupted. docs/artifacts.md says what
    is not atomic."""
    if STDOUT in paths:
        raise OutputError("outputs written together cannot go to stdout", "give file names")
    temps: list[str] = []
    try:
        with deferred():
            for path in paths:
                target = Path(path)
                fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
                os.close(fd)
                temps.append(tmp)
        yield list(temps)
        with deferred():
            for tmp, path in zip(temps, paths, strict=True):
                os.replace(tmp, path)
            temps.clear()
    except BaseException as e:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {', '.join(paths)}: {e.strerror}",
                              "check the disk space and permissions") from None
        raise


class OutputLock:
    """``OUTPUT.lock``, held (``flock``, not waited for) while a run writes OUTPUT or uses ``OUTPUT.resume*``.

    A second run on the same output is refused instead of interleaving its writes with the first's.
    The file holds the holder's pid for the error message and is removed when the lock is released.
    """

    def __init__(self, output: str) -> None:
        import fcntl

        self.path = f"{output}.lock"
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise OutputError(f"cannot create the lock file {self.path}: {e.strerror}",
                                  "check the folder's permissions") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(f"{output} is being written by another eetool run ({_holder(self.path)})",
                                  "wait for it to finish, or write to another file") from None
            # The holder before us may have removed the file between our open and our lock: then we hold a
            # lock on a file nobody else can find, and try again on the path as it is now.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            with deferred():
                Path(self.path).unlink(missing_ok=True)  # before the unlock: no one locks a file about to vanish
                os.close(self.fd)
                self.fd = None


def _holder(lock_path: str) -> str:
    try:
        pid = Path(lock_path).read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "pid unknown"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------
# Tensors


def write_tensors(path: str, tensors: dict[str, torch.Tensor], prov: Provenance,
                  extra: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    if path == STDOUT:  # the commands refuse it first, as a usage error; this guards every other caller
        raise OutputError("safetensors artifacts are binary and do not go to stdout", "give a file name")
    meta = prov.to_metadata()
    meta.update(extra or {})
    atomic_write(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))


def require_file(path: str | os.PathLike[str], what: str = "", hint: str = "check the path") -> Path:
    """``path`` as a Path, refused unless it is a regular file: missing, a folder, or a pipe, device or socket
    (which would block or never end) each get their own message. ``what`` names the file's role."""
    p = Path(path)
    name = f"{what} {path}" if what else str(path)
    if not p.exists():
        raise InputError(f"{name} does not exist", hint)
    if p.is_dir():
        raise InputError(f"{name} is a folder, not a file", hint)
    if not p.is_file():
        raise InputError(f"{name} is not a regular file (a pipe, device or socket)",
                         "give a file; save what a pipe gives to a file first")
    return p


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors and the metadata of a safetensors file, with one-line errors for bad files."""
    from safetensors import SafetensorError, safe_open

    p = require_file(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path} is not a readable safetensors file ({reason})",
                         "re-create or re-download it") from None
    return tensors, meta


def read_tensors(path: str, kind: str) -> tuple[dict[str, torch.Tensor], Provenance, dict[str, str]]:
    tensors, meta = read_safetensors(path)
    _check_kind(path, meta.get("eetool.kind"), meta.get("eetool.schema"), kind)
    return tensors, _well_formed(path, kind, Provenance.from_metadata, meta), meta


def _well_formed(path: str, kind: str, parse: Callable[[Source], Provenance], source: Source) -> Provenance:
    """The provenance parsed from an artifact, refused when a field has the wrong type (a hand edit)."""
    remake = f"re-make it with `{KINDS[kind][1]}`"
    try:
        prov: Provenance = parse(source)
    except (KeyError, TypeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise ProvenanceError(f"{path} has a malformed provenance ({type(e).__name__}: {e})", remake) from None
    wrong = [name for name, ok in (
        ("checkpoint_sha256", isinstance(prov.checkpoint_sha256, str)),
        ("model_sha256", isinstance(prov.model_sha256, str)),
        ("exits", isinstance(prov.exits, list) and all(isinstance(e, str) for e in prov.exits)),
        ("dataset", isinstance(prov.dataset, str)),
        ("args", isinstance(prov.args, dict)),
        ("inputs", isinstance(prov.inputs, dict)
         and all(isinstance(k, str) and isinstance(v, str) for k, v in prov.inputs.items())),
        ("processes", isinstance(prov.processes, int) and not isinstance(prov.processes, bool) and prov.processes >= 1),
    ) if not ok]
    if wrong:
        raise ProvenanceError(f"{path} has a malformed provenance ({', '.join(wrong)} of the wrong type)", remake)
    return prov


def _check_kind(path: str, found_kind: str | None, found_schema: str | int | None, kind: str) -> bool:
    schema, maker = KINDS[kind]
    if found_kind is None:
        raise ProvenanceError(f"{path} is not an eetool artifact (no eetool.kind)", f"make it with `{maker}`")
    if found_kind != kind:
        raise ProvenanceError(f"{path} is a {found_kind} artifact, not {kind}",
                              f"make {'an' if kind[0] in 'aeiou' else 'a'} {kind} artifact with `{maker}`")
    if str(found_schema) != str(schema):
        raise ProvenanceError(
            f"{path} has {kind} schema {found_schema}, this eetool reads schema {schema}", f"re-make it with `{maker}`"
        )
    return True


def verify(path: str, prov: Provenance, *, checkpoint: CheckpointIdentity | None = None, exits: list[str] | None = None,
           dataset: str | None = None, inputs: dict[str, str] | None = None) -> None:
    """Refuse an artifact made from another checkpoint, other exits, another dataset or other input artifacts.

    Every field asked about must be recorded: an artifact that records none (an empty field, as a hand edit
    leaves it) is refused, not taken to fit anything.
    """
    maker = KINDS[prov.kind][1]
    remake = f"re-make it with `{maker}`"
    for kind, sha in (inputs or {}).items():
        made_from = prov.inputs.get(kind)
        if not made_from:
            raise ProvenanceError(f"{path} records no {kind} artifact it was made from", remake)
        if made_from != sha:
            raise ProvenanceError(
                f"{path} was made from another {kind} artifact ({made_from[:12]}, not {sha[:12]})",
                f"re-make it from this one with `{maker}`",
            )
    if checkpoint is not None:
        if not prov.checkpoint_sha256:
            raise ProvenanceError(f"{path} records no checkpoint", f"re-make it for this checkpoint with `{maker}`")
        if not checkpoint.made(prov):
            raise ProvenanceError(
                f"{path} was made from checkpoint {prov.checkpoint_sha256[:12]}, not {checkpoint.sha256[:12]}",
                f"re-make it for this checkpoint with `{maker}`",
            )
    if exits is not None:
        if not prov.exits:
            raise ProvenanceError(f"{path} records no exits", remake)
        if list(prov.exits) != list(exits):
            wanted = ",".join(exits)
            # Only the commands that choose exits take --exits; the others follow their inputs' exits.
            how = f"`{maker} --exits {wanted}`" if prov.kind in ("class-means", "exit-heads") else f"`{maker}`"
            raise ProvenanceError(f"{path} was made for exits {','.join(prov.exits)}, not {wanted}",
                                  f"re-make it for these exits with {how}")
    if dataset is not None:
        if not prov.dataset:
            raise ProvenanceError(f"{path} records no dataset", remake)
        if prov.dataset != dataset:
            raise ProvenanceError(
                f"{path} was made for dataset {prov.dataset}, not {dataset}",
                f"use the same --data/--split or re-make it with `{maker}`",
            )


# ---------------------------------------------------------------------------------------------
# YAML


class _PlainDumper(yaml.SafeDumper):
    """Writes a value that appears twice (a result also kept in the provenance) twice, not as an &anchor."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def dump_yaml(data: Mapping[str, object], prov: Provenance) -> bytes:
    doc = {"schema": f"eetool/{prov.kind}@{prov.schema}", **data, "provenance": prov.to_dict()}
    return yaml.dump(doc, Dumper=_PlainDumper, sort_keys=False, allow_unicode=True).encode()


def write_yaml(path: str, data: Mapping[str, object], prov: Provenance) -> None:
    atomic_write(path, dump_yaml(data, prov))


# eetool's YAML files (artifacts, configs, flag values) are small, and written without anchors; these bound
# what a hand-made file can make a reader allocate: its bytes, and its nodes with every alias expanded (a
# "billion laughs" document of a few hundred bytes expands to 10^9 nodes, which is reached by anything that
# walks the loaded value: writing it to JSON, printing it).
MAX_YAML_BYTES = 16 << 20
MAX_YAML_NODES = 1_000_000


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses a document whose aliases expand it past MAX_YAML_NODES nodes, or loop."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # PyYAML keeps the last of two equal keys; a file that says one thing twice is refused instead.
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue
            if key in seen:
                raise YamlDuplicateKey(f"the key {key!r} appears twice in one mapping "
                                       f"(line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class YamlTooLarge(yaml.YAMLError):
    pass


class YamlDuplicateKey(yaml.YAMLError):
    pass


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the nodes the document has with aliases expanded, sharing the count of a node met again."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # the nodes whose subtrees are being counted: the ancestors of the current one
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_counted = stack.pop()
        key = id(node)
        if children_counted:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(node))
            if sizes[key] > MAX_YAML_NODES:
                raise YamlTooLarge(f"its aliases expand it past {MAX_YAML_NODES} values")
        elif key not in sizes:
            if key in open_nodes:
                raise YamlTooLarge("an alias refers to a value that holds it")
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node) if id(c) not in sizes)


def load_yaml(text: str, what: str, error: type[EetoolError] = InputError) -> object:
    """The one YAML parser of eetool: safe types only, alias expansion and nesting bounded.

    A document refused for its size raises ``error`` naming ``what``; a syntax error raises yaml.YAMLError,
    for the caller to word.
    """
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader: safe types only
    except YamlTooLarge as e:
        raise error(f"{what} is refused: {e}", "write it without anchors and aliases (&name, *name)") from None
    except YamlDuplicateKey as e:
        raise error(f"{what} is refused: {e}", "keep one of the two") from None
    except RecursionError:
        raise error(f"{what} nests too deep", "write it with fewer nested lists and mappings") from None


def read_yaml_text(path: str | os.PathLike[str]) -> str:
    """A YAML file's text, refused when larger than any YAML file eetool reads (read no further than that, so a
    device or a pipe that never ends is refused too); OSError and UnicodeDecodeError are the caller's to word."""
    with open(path, "rb") as f:
        data = f.read(MAX_YAML_BYTES + 1)
    if len(data) > MAX_YAML_BYTES:
        raise InputError(f"{path} is larger than the {MAX_YAML_BYTES} bytes a YAML file of eetool's may have",
                         "check that it is the file you meant")
    return data.decode()


def read_yaml(path: str, kind: str) -> tuple[dict[str, Any], Provenance]:
    p = require_file(path)
    try:
        doc = load_yaml(read_yaml_text(p), str(path))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid YAML ({type(e).__name__})", "re-create it") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}", "check the path") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("provenance"), dict):
        raise ProvenanceError(f"{path} is not an eetool artifact (no provenance)", f"make it with `{KINDS[kind][1]}`")
    prov_d = doc["provenance"]
    _check_kind(path, prov_d.get("kind"), prov_d.get("schema"), kind)
    return doc, _well_formed(path, kind, Provenance.from_dict, prov_d)
