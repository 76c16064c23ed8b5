"""reproduce/pages.py and the results pages the reproductions write: the templates stay in step with the committed
pages, and the generated tables have the pages' form (on fake results: nothing is run, no page is rewritten)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "reproduce/pages").glob("*.md"))


@pytest.fixture(scope="module")
def pages(load_script: Callable[[str], ModuleType]) -> ModuleType:
    return load_script("reproduce/pages.py")


def parts_of(template: str, page: str) -> dict[str, str] | None:
    """The generated parts of ``page`` where ``template`` has its marks (None when the fixed prose differs)."""
    pieces = re.split(r"\{\{ *([a-z_]+) *\}\}", template)
    pattern = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>.*?)" for k, p in enumerate(pieces))
    match = re.fullmatch(pattern, page, re.S)
    return None if match is None else match.groupdict()


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
def test_each_template_is_its_committed_page_less_the_generated_parts(template: Path, pages: ModuleType) -> None:
    page = (ROOT / "docs/results" / template.name).read_text(encoding="utf-8")
    parts = parts_of(template.read_text(encoding="utf-8"), page)
    assert parts is not None, f"docs/results/{template.name} was edited by hand: edit reproduce/pages/{template.name}"
    assert all(parts.values())
    assert pages.render(template.read_text(encoding="utf-8"), parts) == page


def test_render_refuses_a_missing_or_an_extra_part(pages: ModuleType, tmp_path: Path) -> None:
    assert pages.render("a {{ x }} b {{y}}", {"x": "1", "y": "2"}) == "a 1 b 2"
    with pytest.raises(ValueError, match="differ"):
        pages.render("a {{ x }} b {{ y }}", {"x": "1"})
    with pytest.raises(ValueError, match="differ"):
        pages.render("a {{ x }}", {"x": "1", "y": "2"})
    written = pages.write_page("fixed-budget", {"table": "| t |"}, tmp_path / "page.md")
    assert written == tmp_path / "page.md" and "| t |" in written.read_text() and "{{" not in written.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["page.md"]


def test_fixed_budget_table_from_the_pages_numbers_is_the_pages_table(load_script: Callable[[str], ModuleType]) -> None:
    fb = load_script("reproduce/fixed_budget_table.py")
    page = (ROOT / "docs/results/fixed-budget.md").read_text(encoding="utf-8")
    table = parts_of((ROOT / "reproduce/pages/fixed-budget.md").read_text(encoding="utf-8"), page)["table"]
    evaluations: dict[str, Any] = {}
    for (label, name), row in zip(fb.ROWS, table.splitlines()[2:], strict=True):
        assert row.startswith(f"| {label} |")
        cells = re.findall(r"([\d.]+)% \(([\d.]+)\)", row)
        evaluations[name] = {"points": [{"name": "plain", "accuracy": 0.9, "cost": 1.0}] + [
            {"name": f"budget {b}", "accuracy": float(a) / 100, "cost": float(c)}
            for b, (a, c) in zip(fb.BUDGETS, cells, strict=True)]}
    generated, curves = fb.tabulate(evaluations)
    assert generated == table
    assert list(curves) == [label for label, _ in fb.ROWS]
    del evaluations["sdn-6"]  # a method not evaluated has no row
    assert "SDN, 6 epochs" not in fb.tabulate(evaluations)[0]


def test_dataset_pruning_page_tables_on_fake_results(load_script: Callable[[str], ModuleType],
                                                     tmp_path: Path) -> None:
    dp = load_script("reproduce/dataset_pruning.py")

    def put(name: str, doc: dict[str, Any]) -> None:
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))

    history = [{"samples_seen": 50_000, "eval_accuracy": 0.80}, {"samples_seen": 100_000, "eval_accuracy": 0.8991}]
    put("train-none", {"eval_accuracy": 0.8994, "samples_seen": 160_000, "history": history})
    put("train-eeprune-30", {"eval_accuracy": 0.9003, "samples_seen": 112_000,
                             "history": [{"samples_seen": 98_000, "eval_accuracy": 0.8950}]})
    put("train-random-30", {"eval_accuracy": 0.8845, "samples_seen": 112_000, "history": history[:1]})
    thresholds = (0.9959, 0.9867, 0.9627, 0.9092, 0.8313, 0.7173)
    for r, t in zip(dp.RATIOS, thresholds, strict=True):
        put(f"eeprune-{dp.pct(r)}", {"exit": "layer2.1", "threshold": t, "pruning_phase": {
            "runs": 1, "epochs": 3, "samples_seen": 60_000, "samples_scored": 20_000, "seconds": 121.4}})
    put("svp-10", {"exit": None, "pruning_phase": {"runs": 1, "epochs": 3, "samples_seen": 60_000,
                                                   "samples_scored": 0, "seconds": 44.2, "proxy_arch": "resnet8"}})
    put("random-10", {"exit": None, "pruning_phase": {"runs": 0, "epochs": 0, "samples_seen": 0,
                                                      "samples_scored": 0, "seconds": 0.0}})
    parts = dp.page_parts(tmp_path)
    page = (ROOT / "docs/results/dataset-pruning.md").read_text(encoding="utf-8")
    assert parts["baseline"] == "89.94% after 160,000 samples"
    accuracy = parts["accuracy_table"].splitlines()
    assert accuracy[0] in page and accuracy[1] in page
    # bold at or above no pruning; within 0.5 points of it at 98,000 samples; random never
    assert "| **90.03%** (112,000; 98,000) |" in accuracy[2] and accuracy[2].startswith("| eeprune | failed |")
    assert "| 88.45% (112,000; –) |" in next(row for row in accuracy if row.startswith("| random |"))
    phases = parts["phase_table"].splitlines()
    assert f"{phases[0]}\n{phases[1]}\n" in page
    # these rows are the committed page's, cell for cell
    assert phases[2:] == ["| eeprune (exit after `layer2.1`, mid) | 1 × 3 | 60,000 | 20,000 | 121 | "
                          "0.9959, 0.9867, 0.9627, 0.9092, 0.8313, 0.7173 |",
                          "| svp (ResNet-8) | 1 × 3 | 60,000 | 0 | 44 | |", "| random | – | 0 | 0 | 0 | |"]
    assert all(row in page for row in phases[2:])
    assert dp.page_parts(tmp_path / "nothing") is None


def table_rows(table: str) -> list[list[str]]:
    return [[c.strip() for c in row.strip("|").split("|")] for row in table.splitlines()[2:]]


@pytest.mark.parametrize("page", ["segmentation", "segmentation-atlas", "segmentation-torchvision"])
def test_segmentation_pages_tables_from_their_numbers_are_the_pages_tables(
        page: str, load_script: Callable[[str], ModuleType]) -> None:
    """Evaluations made of the numbers on the committed page give back its tables, row for row."""
    seg = load_script("reproduce/segmentation.py")
    committed = (ROOT / f"docs/results/{page}.md").read_text(encoding="utf-8")
    parts = parts_of((ROOT / f"reproduce/pages/{page}.md").read_text(encoding="utf-8"), committed)
    assert parts is not None
    by_label = {seg.page_label(name): name for name, _, _ in seg.METHODS}
    evals: dict[str, Any] = {}
    for cells in table_rows(parts["last_exit_table"]):
        shares = [float(x) for x in cells[4].split(" / ")] if len(cells) == 7 else [0.25] * 4
        # a cost that rounds to the page's and whose inverse rounds to its analytic speed-up (the run's unrounded one)
        cost = next(c for c in (float(cells[2]) + k / 1e6 for k in range(-500, 500))
                    if f"{c:.3f}" == cells[2] and f"{1 / c:.2f}x" == cells[-1])
        evals[by_label[cells[0]]] = {"points": [{}, {
            "miou": float(cells[1]) / 100, "cost": cost, "executed_cost": float(cells[3]),
            "speedup": float(cells[-2].rstrip("x")), "exit_shares": dict(zip(seg.EXITS, shares, strict=True))}]}
    for cells in table_rows(parts.get("anytime_table", "\n\n")):
        if cells[0].endswith("(this run)"):
            pairs = [tuple(float(x) for x in cell.split(" / ")) for cell in cells[2:]]
            evals[by_label[cells[1]]]["points"][1]["anytime"] = {
                e: {"miou": m / 100, "gflops": g} for e, (m, g) in zip(seg.EXITS, pairs, strict=True)}
    assert seg.page_parts(page, evals) == parts
    assert seg.page_name("fashion-mnist-scenes", "eeseg") == "segmentation"
    assert seg.page_name("brain-atlas", "eeseg") == "segmentation-atlas"
    assert seg.page_name("fashion-mnist-scenes", "lraspp_mobilenet_v3_large") == "segmentation-torchvision"
    assert seg.page_name("fashion-mnist-scenes", "fcn_resnet50") is None  # no page reports that network
