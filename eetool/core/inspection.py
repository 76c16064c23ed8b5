"""``eetool inspect``: what a checkpoint is (its exits, output shapes and cumulative costs, dense and effective)
or what an artifact holds (its provenance and contents)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eetool.core.reporting import format_fields, format_table

if TYPE_CHECKING:
    from eetool.core.options import Run


@dataclass(frozen=True)
class InspectRequest:
    file: str | None
    checkpoint: str | None  # described as a checkpoint whatever its name
    exits: str
    unit: str  # macs or flops


def inspect_file(run: Run, req: InspectRequest) -> None:
    """Describe ``req.checkpoint``, or ``req.file`` as a checkpoint or as an artifact, on stdout."""
    from eetool.core.errors import UsageError

    target = req.checkpoint or req.file
    if not target:
        raise UsageError("nothing to inspect", "give a FILE or --checkpoint (e.g. --checkpoint demo)")
    if req.checkpoint is None and not _is_checkpoint(target) and run.model_options.arch is None:
        _describe_artifact(run, target)
        return
    _describe_checkpoint(run, target, req.exits, req.unit)


def _is_checkpoint(path: str) -> bool:
    from eetool.core.artifacts import read_safetensors
    from eetool.core.checkpoint import SPEC_KEY

    if path == "demo":
        return True
    if not path.endswith(".safetensors"):
        return Path(path).suffix.lower() in (".pt", ".pth", ".bin", ".ckpt")
    _, meta = read_safetensors(path)
    return SPEC_KEY in meta or "eetool.kind" not in meta


def _describe_checkpoint(run: Run, ref: str, exits: str, unit: str) -> None:
    from eetool.core.costs import effective, in_unit, measure, zero_fraction
    from eetool.core.exits import HOOK, build_exit_model
    from eetool.core.run_inputs import open_checkpoint

    ckpt = open_checkpoint(run, ref)
    run.torch()
    em = build_exit_model(ckpt.model, exits)
    costs = measure(em, ckpt.spec.input_shape)
    shapes = em.exit_shapes(ckpt.spec.input_shape)
    cumulative = costs.backbone_cumulative()
    # A pruned checkpoint's effective cost (zero weights cost nothing, see eetool.core.costs) beside the dense one;
    # equal to it for an unpruned checkpoint.
    sparse = effective(costs, em, ckpt.spec.input_shape)
    pruned = sparse is not costs
    sparse_cumulative = sparse.backbone_cumulative()
    rows = [
        {"exit": name, "shape": list(shape), unit: int(in_unit(c, unit)), "normalised": round(c / costs.model_macs, 6),
         f"effective_{unit}": int(in_unit(e, unit)), "effective_normalised": round(e / costs.model_macs, 6)}
        for name, shape, c, e in zip(em.exits, shapes, cumulative, sparse_cumulative, strict=False)
    ]
    rows.append({"exit": "head", "shape": [ckpt.spec.num_classes], unit: int(in_unit(costs.model_macs, unit)),
                 "normalised": 1.0, f"effective_{unit}": int(in_unit(sparse.model_macs, unit)),
                 "effective_normalised": round(sparse.model_macs / costs.model_macs, 6)})
    spec = ckpt.spec
    doc: dict[str, Any] = {
        "checkpoint": ckpt.path,
        "sha256": ckpt.sha256,
        "model_sha256": ckpt.model_sha256,
        "arch": spec.arch,
        "arch_args": spec.arch_args,
        "num_classes": spec.num_classes,
        "classes": spec.classes,
        "input_shape": list(spec.input_shape),
        "mean": spec.mean,
        "std": spec.std,
        "parameters": sum(p.numel() for p in ckpt.model.parameters()),
        "mode": em.mode,
        "unit": unit,
        "model_cost": int(in_unit(costs.model_macs, unit)),
        "weight_sparsity": round(zero_fraction([ckpt.model]), 6),
        "pruned": pruned,
        "effective_model_cost": int(in_unit(sparse.model_macs, unit)),
        "exits": rows,
        "training": (ckpt.provenance.args.get("training") if ckpt.provenance else None),
    }
    note = ("hook mode: the model cannot be split, features are tapped by hooks and exits save compute only "
            "in the accounting" if em.mode == HOOK else "split mode: inference really stops at an exit")
    run.emit(doc, lambda d: _checkpoint_text(d, note))


def _checkpoint_text(d: dict[str, Any], note: str) -> str:
    unit = d["unit"]
    head = format_fields([
        ("checkpoint", d["checkpoint"]), ("sha256", d["sha256"]), ("arch", d["arch"]),
        ("classes", _classes(d["num_classes"], d["classes"])),
        ("input", "x".join(map(str, d["input_shape"])) + f", mean {d['mean']}, std {d['std']}"),
        ("parameters", d["parameters"]), ("mode", note),
        ("model cost", f"{d['model_cost']:,} {unit} per sample"),
    ] + ([("pruned", f"{d['weight_sparsity']:.2%} of the convolution and linear weights are zero; effective "
                     f"cost {d['effective_model_cost']:,} {unit} per sample (zero weights cost nothing: what "
                     "sparse kernels would compute; dense kernels take the dense time)")] if d["pruned"] else [])
    + ([("training", ", ".join(f"{k} {v}" for k, v in d["training"].items()))] if d["training"] else []))
    table = format_table(["exit", "output shape", f"cumulative {unit}", "normalised",
                          *([f"effective {unit}", "effective normalised"] if d["pruned"] else [])],
                         [[r["exit"], "x".join(map(str, r["shape"])), f"{r[unit]:,}", r["normalised"],
                           *([f"{r[f'effective_{unit}']:,}", r["effective_normalised"]] if d["pruned"] else [])]
                          for r in d["exits"]])
    return head + "\n\n" + table


def _classes(count: int, names: list[str]) -> str:
    if not names:
        return str(count)
    return f"{count} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"


def _describe_artifact(run: Run, path: str) -> None:
    from eetool.core.artifacts import KINDS, read_safetensors, read_tensors
    from eetool.core.errors import InputError, ProvenanceError

    if path.endswith(".safetensors"):
        _, meta = read_safetensors(path)
        kind = meta.get("eetool.kind", "")
        if kind not in KINDS:
            raise ProvenanceError(f"{path} is an artifact of unknown kind {kind!r}",
                                  f"inspect eetool's artifacts ({', '.join(KINDS)}) or checkpoints")
        tensors, parsed, _ = read_tensors(path, kind)  # the provenance checked as every reader checks it
        prov = parsed.to_dict()
        contents = [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                    for k, v in tensors.items()]
    else:
        import yaml

        from eetool.core.artifacts import load_yaml, read_yaml_text, require_file

        require_file(path)
        try:
            doc = load_yaml(read_yaml_text(path), path)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            raise InputError(f"cannot read {path} as a checkpoint or artifact",
                             "inspect a .safetensors/.pt checkpoint or an eetool YAML output") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("provenance"), dict):
            raise InputError(f"{path} is not an eetool artifact", "inspect a checkpoint or an eetool output")
        prov = doc["provenance"]
        contents = [{"name": k, "shape": [], "dtype": type(v).__name__} for k, v in doc.items()
                    if k not in ("provenance", "schema")]
    out = {"file": path, "provenance": prov, "contents": contents}

    def text(d: dict[str, Any]) -> str:
        p = d["provenance"]
        args = p.get("args") if isinstance(p.get("args"), dict) else {}
        head = format_fields([(k, v) for k, v in p.items() if k != "args"]
                             + [("args", ", ".join(f"{k}={v}" for k, v in args.items()))])
        table = format_table(["name", "shape", "dtype"],
                             [[c["name"], "x".join(map(str, c["shape"])), c["dtype"]] for c in d["contents"]])
        return head + "\n\n" + table

    run.emit(out, text)
