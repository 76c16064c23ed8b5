"""eetool import: foreign weights plus the options that build them, made an eetool checkpoint once."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from eetool.core.options import CheckpointOpt, ForceOpt, Run, eetool_command
from eetool.core.reporting import format_fields
from eetool.core.run_inputs import open_checkpoint


@eetool_command("checkpoint", model_options=True)
def command(
    run: Run,
    checkpoint: CheckpointOpt,
    output: Annotated[str, typer.Option("--output", "-o", help="The eetool checkpoint to write (.safetensors).")],
    classes: Annotated[str | None, typer.Option("--classes", help="Class names, comma-separated, in the order of "
                                                "the model's outputs (reports name them).")] = None,
    force: ForceOpt = False,
) -> None:
    """Turn foreign weights (a state dict .pt/.pth/.safetensors) and --arch and friends into an eetool checkpoint
    that records them, so later commands need only --checkpoint. Writes -o."""
    from eetool.core.artifacts import STDOUT, Provenance, sha256_file
    from eetool.core.checkpoint import save_checkpoint
    from eetool.core.errors import UsageError

    if output == STDOUT or not output.endswith(".safetensors"):
        raise UsageError(f"-o {output}: an eetool checkpoint is a .safetensors file",
                         "give a file name ending in .safetensors")
    run.check_output(output, force=force, inputs=(checkpoint,), binary=True)
    ckpt = open_checkpoint(run, checkpoint)
    names = [c.strip() for c in classes.split(",")] if classes else []
    if names and (len(names) != ckpt.spec.num_classes or not all(names)):
        raise UsageError(f"--classes names {len(names)} classes, the weights have {ckpt.spec.num_classes}",
                         "give one non-empty name per output, comma-separated")
    spec = ckpt.spec
    spec.classes = names or spec.classes
    prov = Provenance(kind="checkpoint", checkpoint_sha256=ckpt.sha256, model_sha256=ckpt.model_sha256,
                      args={**run.args, "imported_from": ckpt.path})
    save_checkpoint(output, ckpt.model, spec, prov)
    run.wrote(output)
    doc: dict[str, Any] = {
        "output": output, "sha256": sha256_file(output), "imported_from": ckpt.path,
        "source_sha256": ckpt.sha256, "model_sha256": ckpt.model_sha256, "arch": spec.arch,
        "arch_args": spec.arch_args, "num_classes": spec.num_classes, "classes": spec.classes,
        "input_shape": list(spec.input_shape), "mean": spec.mean, "std": spec.std,
        "parameters": sum(p.numel() for p in ckpt.model.parameters()),
    }
    run.emit(doc, lambda d: format_fields([
        ("checkpoint", f"{d['output']} (sha256 {d['sha256'][:12]})"),
        ("imported from", f"{d['imported_from']} (sha256 with options {d['source_sha256'][:12]})"),
        ("arch", f"{d['arch']} {d['arch_args'] or ''}".strip()),
        ("classes", str(d["num_classes"]) + (f" ({', '.join(d['classes'][:4])}"
                                             f"{', ...' if len(d['classes']) > 4 else ''})" if d["classes"] else "")),
        ("input", "x".join(map(str, d["input_shape"])) + f", mean {d['mean']}, std {d['std']}"),
        ("parameters", f"{d['parameters']:,}"),
        ("model sha256", d["model_sha256"][:12] + " (artifacts made from either file are accepted for the other)"),
    ]))
