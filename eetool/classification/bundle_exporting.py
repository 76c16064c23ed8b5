"""`export`'s pipeline for a classifier: the checks, the bundle's spec from the checkpoint and its exit artifacts,
writing and self-checking the bundle folder, and the optional int8 quantisation. Method:
docs/predict-and-export.md."""

from __future__ import annotations

from typing import Any

from eetool.core.bundles import ExportRequest
from eetool.core.options import Run
from eetool.core.run_inputs import open_checkpoint


def export_bundle(run: Run, req: ExportRequest) -> None:
    """Write req.output as a checked bundle (exit 5 when onnxruntime and eetool disagree), then report it."""
    checkpoint, output, means, exit_heads, thresholds = (req.checkpoint, req.output, req.means, req.exit_heads,
                                                         req.thresholds)
    force = req.force
    import tempfile
    from pathlib import Path

    import torch

    from eetool.classification.bundle_export import BundleSpec, check_exportable, self_check
    from eetool.classification.bundle_export import write_bundle as write
    from eetool.classification.early_exit_evaluation import early_exit_setup
    from eetool.core.artifacts import sha256_file
    from eetool.core.bundles import bundle_folder, check_target, preprocessing_record, require_onnx, seal
    from eetool.core.datasets import Preprocess
    from eetool.core.errors import UsageError

    if bool(means or exit_heads) != bool(thresholds):
        raise UsageError("early exits need --means and --thresholds (or --exit-heads and --thresholds)",
                         "pass them together, or none for the plain model")
    if req.quantize == "int8" and req.calibration_data is None:
        raise UsageError("--quantize int8 needs --calibration-data: images of the model's own data set the int8 "
                         "ranges of every stage", "add --calibration-data NAME[:PATH] (e.g. the training data)")
    if req.quantize == "none" and req.calibration_data is not None:
        raise UsageError("--calibration-data is read only with --quantize int8", "add --quantize int8, or drop it")
    require_onnx()
    target = Path(output)
    check_target(target, force, (checkpoint, means, exit_heads, thresholds))
    ckpt = open_checkpoint(run, checkpoint)
    run.torch()
    ckpt.model.eval()
    spec = ckpt.spec
    preprocess = Preprocess(spec.input_shape, spec.mean, spec.std)
    input_hw = (spec.input_shape[1], spec.input_shape[2])
    geometry = run.data_options.geometry(spec.arch, input_hw, spec.resize)
    if geometry.crop != input_hw:
        raise UsageError(f"--crop {geometry.crop} differs from the model's input {input_hw}",
                         "a bundle takes images at the model's input size: drop --crop")
    sources = {"checkpoint": {"path": ckpt.path, "sha256": ckpt.sha256, "model_sha256": ckpt.model_sha256}}
    for kind, path in (("class-means", means), ("exit-heads", exit_heads), ("thresholds", thresholds)):
        if path:
            sources[kind] = {"path": path, "sha256": sha256_file(path)}
    if thresholds:
        em, rule, (cost_model, _), chosen, clusters, fitted = early_exit_setup(ckpt, means, exit_heads, thresholds,
                                                                                "all", "cpu")
        check_exportable(em)
        assert em.stages is not None  # check_exportable refuses a model run whole
        method = fitted.method
        points: list[dict[str, Any]] = [{k: p[k] for k in ("budget", "cost", "accuracy", "thresholds") if k in p}
                                        for _, p in chosen]
        stages, exits, costs = list(em.stages), list(em.exits), cost_model.normalised_exit_costs()
    else:
        em, rule, clusters, method, points = None, None, False, "plain", []
        stages, exits, costs = [ckpt.model], [], [1.0]
    classes = [f"cluster {k}" for k in range(spec.num_classes)] if clusters else (
        spec.classes or [str(k) for k in range(spec.num_classes)])
    bundle = BundleSpec(
        model=ckpt.model, preprocess=preprocess, input_hw=input_hw, classes=classes, stages=stages, exits=exits,
        rule=rule, method=method, points=points, exit_costs=costs,
        preprocessing=preprocessing_record(spec, geometry),
        provenance={"sources": sources, "args": run.args, "torch": str(torch.__version__)})
    images, labels, sample_name = _check_sample(run, req.data, req.split, spec, req.check_samples)
    calibration = (_calibration(run, req.calibration_data, req.calibration_split, req.calibration_samples, spec)
                   if req.calibration_data is not None else None)
    with bundle_folder(target, force, (checkpoint, means, exit_heads, thresholds)) as tmp, \
            tempfile.TemporaryDirectory(prefix=f".{target.name}.parts.", dir=target.parent) as parts:
        run.reporter.log(f"exporting {len(stages)} stages and {len(exits)} exit decisions")
        doc = write(bundle, tmp, Path(parts))
        report = self_check(bundle, tmp, doc, images, em)
        quantized = None
        if calibration is not None:
            from eetool.classification.bundle_quantization import quantize_bundle

            run.reporter.log(f"quantising {len(stages)} stages to int8 on {len(calibration.images)} samples of "
                             f"{calibration.data}")
            quantized = quantize_bundle(tmp, Path(parts), doc, calibration, images.numpy(),
                                        None if labels is None else labels.numpy(), sample_name)
            doc["provenance"]["quantization"] = quantized
            seal(tmp, doc)
    for r in report:
        run.reporter.log(f"checked point {r['point']} on {r['samples']} samples of {sample_name}: "
                         f"{r['agree']} agree, {r['differ_within_tolerance']} differ within 1e-5 of a threshold")
    for q in quantized["check"]["points"] if quantized else []:
        accuracy = (f"; accuracy {q['accuracy']['float']:.4f} float, {q['accuracy']['int8']:.4f} int8"
                    if "accuracy" in q else "")
        run.reporter.log(f"int8 at point {q['point']}: the same class as the float bundle on "
                         f"{q['class_agreement']:.1%}, the same exit on {q['exit_agreement']:.1%}; mean cost "
                         f"{q['cost']['float']:.4f} float, {q['cost']['int8']:.4f} int8{accuracy}")
    run.wrote(output)
    result = {"bundle": output, "stages": len(stages), "exits": exits, "points": len(points),
              "check": {"data": sample_name, "points": report}, "files": doc["files"]}
    if quantized:
        result["quantization"] = quantized
    run.emit(result, lambda d: "\n".join(f"{name}  {sha}" for name, sha in d["files"].items()))


def _check_sample(run: Run, data: str | None, split: str, spec: Any, count: int) -> tuple[Any, Any, str]:
    """uint8 N x 3 x H x W images to check the bundle on, their labels (None where there are none) and what they
    are."""
    import torch

    from eetool.core.run_inputs import load_data

    _, h, w = spec.input_shape
    if data is None:
        from eetool.core.datasets import load_dataset

        ds = load_dataset("demo", "test")
        assert ds.images is not None
        if tuple(ds.image_shape[1:]) != (h, w):
            gen = torch.Generator().manual_seed(run.seed)
            return (torch.randint(0, 256, (count, 3, h, w), dtype=torch.uint8, generator=gen), None,
                    "seeded random images")
    else:
        ds = load_data(run, data, split, None, spec)
    n = min(count, len(ds))
    images, labels, _ = next(ds.batches(n))
    if tuple(images.shape[2:]) != (h, w):
        from eetool.core.errors import InputError

        raise InputError(f"{ds.spec}'s images are {tuple(images.shape[2:])}, the model takes {(h, w)}",
                         "check the bundle on data of the model's input size")
    known = None if bool((labels < 0).any()) else labels
    return _rgb(images), known, f"{ds.spec}"


def _rgb(images: Any) -> Any:
    """uint8 N x C x H x W as the bundle's first stage takes them (as decoded from files): three channels."""
    return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images[:, :3]


def _calibration(run: Run, data: str, split: str, count: int, spec: Any) -> Any:
    """``count`` samples (seeded) of --calibration-data, refused unless they are images of the model's input size
    and classes: int8 ranges set on other data would not be the model's."""
    import torch

    from eetool.classification.bundle_quantization import Calibration
    from eetool.core.datasets import check_labels
    from eetool.core.errors import ModelMismatchError
    from eetool.core.run_inputs import load_data

    ds = load_data(run, data, split, None, spec)
    channels, h, w = ds.image_shape
    if (h, w) != tuple(spec.input_shape[1:]) or channels not in (1, 3):
        raise ModelMismatchError(f"calibration data {ds.spec} holds {channels} x {h} x {w} images, the model takes "
                                 f"{spec.input_shape[1]} x {spec.input_shape[2]} (1 or 3 channels)",
                                 "calibrate on the model's own data, at its input size")
    classes = spec.classes or [str(k) for k in range(spec.num_classes)]
    if len(ds.classes) != spec.num_classes or (spec.classes and list(ds.classes) != list(spec.classes)):
        raise ModelMismatchError(f"calibration data {ds.spec} has the classes {_names(ds.classes)}, the model "
                                 f"{_names(classes)}", "calibrate on the model's own data")
    check_labels(ds, spec.num_classes)
    n = min(count, len(ds))
    chosen = ds.subset(torch.randperm(len(ds), generator=torch.Generator().manual_seed(run.seed))[:n].sort().values)
    images = torch.cat([batch for batch, _, _ in chosen.batches(256)])
    return Calibration(_rgb(images).numpy(), chosen.spec, chosen.fingerprint)


def _names(classes: list[str]) -> str:
    shown = ", ".join(classes[:4]) + (", ..." if len(classes) > 4 else "")
    return f"{len(classes)} ({shown})"
