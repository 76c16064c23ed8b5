"""The registries of architectures, data sources and exit methods: what the command line shows (help, `eetool
archs`, completion) is derived from them, and a name is registered once."""

from __future__ import annotations

import json

import pytest

from eetool.core.architectures import ARCHITECTURES
from eetool.core.exit_methods import EXIT_METHODS, HEADS, MEANS, reads
from eetool.core.options import complete_data
from eetool.core.registry import Registry
from eetool.core.sources import DATA_SOURCES, source_list
from tests.cli_helpers import invoke, ok


def test_a_name_is_registered_once_with_a_module_and_attribute() -> None:
    registry = Registry("thing")
    registry.register("a", "pkg.mod:attr", help="an a", colour="red")
    with pytest.raises(ValueError, match="twice"):
        registry.register("a", "pkg.mod:other")
    with pytest.raises(ValueError, match="package.module:attribute"):
        registry.register("b", "pkg.mod")
    assert "a" in registry and registry.names() == ("a",) and registry.names(colour="blue") == ()
    assert registry.get("a").load is not None and registry.get("a").info == {"colour": "red"}


def test_an_entry_imports_its_implementation_only_when_loaded() -> None:
    registry = Registry("thing")
    entry = registry.register("join", "os.path:join")
    import os.path

    assert entry.load() is os.path.join


def test_archs_lists_every_registered_architecture_and_source() -> None:
    doc = json.loads(ok(invoke("archs", "--format", "json")).stdout)
    listed = doc["eetool"] + doc["torchvision"]
    assert len(listed) == len(ARCHITECTURES.names()) and set(listed) == set(ARCHITECTURES.names())
    assert doc["datasets"] == list(DATA_SOURCES.names())


def test_help_and_completion_list_every_source_and_method() -> None:
    listed = source_list()
    for entry in DATA_SOURCES:
        assert entry.info.get("usage", entry.name) in listed
        assert any(c.rstrip(":") == entry.name for c in complete_data(entry.name))
    help_text = " ".join(ok(invoke("fit-thresholds", "--help")).stdout.split())
    for name in EXIT_METHODS.names():
        assert name in help_text


def test_methods_say_what_they_read() -> None:
    assert [m for m in EXIT_METHODS.names("classification") if reads(m, MEANS)] == ["e2cm", "e2cm+sdn"]
    assert [m for m in EXIT_METHODS.names("classification") if reads(m, HEADS)] == ["sdn", "entropy", "e2cm+sdn"]
