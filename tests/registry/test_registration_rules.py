"""What may become a version: every problem reported at once, the base model fixed by the first
registration, and nothing left behind (no row, no archive) when an adapter is rejected."""

from __future__ import annotations

import os

import pytest

from registry.errors import AdapterRejectedError, InvalidReferenceError
from registry.service import Registry


def test_an_invalid_adapter_reports_every_problem_and_leaves_nothing(
    registry, make_adapter, artifacts_root, list_archives
):
    registry.register("strict", make_adapter(base_model="org/SmolLM2-135M-Instruct"), actor="a")
    before = (registry.store.revision(), list_archives(artifacts_root))
    bad = make_adapter(
        rank=32,
        base_model="meta-llama/Llama-3.2-1B",
        config={"use_dora": True, "modules_to_save": ["lm_head"]},
    )
    (bad / "extra").symlink_to(bad / "adapter_config.json")
    with pytest.raises(AdapterRejectedError) as caught:
        registry.register("strict", bad, actor="a", lineage={"bad": object()})
    problems = " | ".join(caught.value.problems)
    for expected in (
        "rank 32 is above the server's limit of 16",
        "DoRA",
        "modules_to_save",
        "symbolic link",
        "base model mismatch",
        "lineage",
    ):
        assert expected in problems
    assert str(caught.value).startswith("strict rejected (6 problems): ")
    assert (registry.store.revision(), list_archives(artifacts_root)) == before
    assert registry.store.get_adapter("strict").versions == (1,)


def test_a_rejected_first_registration_creates_no_name(
    registry, make_adapter, artifacts_root, list_archives
):
    folder = make_adapter()
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterRejectedError, match="missing adapter_model.safetensors"):
        registry.register("never", folder, actor="a")
    assert registry.store.list_adapters() == []
    assert list_archives(artifacts_root) == []
    assert registry.store.find_base_model("never") is None


def test_the_first_registration_fixes_the_base_model(registry, make_adapter):
    first = registry.register(
        "based", make_adapter(base_model="/home/ana/models/SmolLM2-135M-Instruct/"), actor="a"
    )
    # A folder named like the embedded model is the embedded model: its one identity.
    assert first.base_model == "smollm2"
    # The same model named by its hub id on another machine is the same base.
    registry.register(
        "based", make_adapter(base_model="HuggingFaceTB/SmolLM2-135M-Instruct"), actor="a"
    )
    with pytest.raises(AdapterRejectedError) as caught:
        registry.register("based", make_adapter(base_model="Qwen/Qwen2.5-0.5B"), actor="a")
    assert caught.value.problems == [
        "base model mismatch: the adapter was trained on 'qwen2.5-0.5b' but based's versions "
        "use 'smollm2'"
    ]
    # Another name is free to use another base.
    assert (
        registry.register("other", make_adapter(base_model="Qwen/Qwen2.5-0.5B"), actor="a").number
        == 1
    )


def test_an_adapter_that_names_no_base_gets_the_configured_one(settings, make_adapter):
    with Registry.open(settings.model_copy(update={"base_model": "SmolLM2"})) as registry:
        version = registry.register("nobase", make_adapter(base_model=None), actor="a")
    assert version.base_model == "smollm2"


def test_the_rank_limit_comes_from_the_settings(settings, make_adapter):
    with Registry.open(settings.model_copy(update={"max_lora_rank": 4})) as registry:
        with pytest.raises(AdapterRejectedError, match="rank 8 is above the server's limit of 4"):
            registry.register("ranked", make_adapter(rank=8), actor="a")
        assert registry.register("ranked", make_adapter(rank=4), actor="a").rank == 4


def test_metadata_and_manifest_are_recorded(registry, make_adapter):
    version = registry.register(
        "meta",
        make_adapter(rank=8),
        actor="ana",
        tags={"dataset": "tickets"},
        lineage={"dataset_sha256": "ab" * 32, "lr": 2e-4},
    )
    again = registry.store.get_version("meta", 1)
    assert again == version
    assert (again.rank, again.alpha, again.target_modules) == (8, 16.0, ("q_proj", "v_proj"))
    assert again.lineage == {"dataset_sha256": "ab" * 32, "lr": 2e-4}
    assert again.created_by == "ana" and again.created_at.tzinfo is not None
    assert again.size_bytes > os.path.getsize(make_adapter() / "adapter_model.safetensors")


def test_a_failed_commit_leaves_the_archive_for_the_sweep(
    registry, make_adapter, artifacts_root, list_archives, monkeypatch
):
    registry.register("kept", make_adapter(name="shared"), actor="a")
    kept = list_archives(artifacts_root)

    def broken(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(registry.store, "add_version", broken)
    with pytest.raises(RuntimeError):
        registry.register("lost", make_adapter(), actor="a")
    with pytest.raises(RuntimeError):
        registry.register("lost", artifacts_root.parent / "adapters" / "shared", actor="a")
    # Nothing is deleted inline (a concurrent registration may hold the same bytes); the new
    # archive is an orphan until the sweep's grace period has passed.
    orphans = sorted(set(list_archives(artifacts_root)) - set(kept))
    assert len(orphans) == 1 and set(kept) <= set(list_archives(artifacts_root))
    monkeypatch.undo()
    assert registry.sweep_orphans(grace_seconds=3600).removed == []
    removed = registry.sweep_orphans(grace_seconds=0).removed
    assert [b.sha256 + ".tar" for b in removed] == [orphans[0].name]
    assert list_archives(artifacts_root) == kept


def test_names_are_checked_before_anything_else(registry, make_adapter):
    with pytest.raises(InvalidReferenceError, match="invalid adapter name 'a@b'"):
        registry.register("a@b", make_adapter(), actor="a")


@pytest.mark.parametrize("actor", ["a" * 129, "", "ana\nlima"], ids=["long", "empty", "newline"])
def test_actors_that_do_not_fit_the_record_are_refused(registry, make_adapter, actor):
    # PostgreSQL enforces the 128-character column: unchecked, a long actor was a driver error.
    with pytest.raises(InvalidReferenceError, match="invalid actor"):
        registry.register("acted", make_adapter(), actor=actor)
    registry.register("acted", make_adapter(), actor="a" * 128)
    with pytest.raises(InvalidReferenceError, match="invalid actor"):
        registry.store.promote("acted", 1, actor=actor)
    assert registry.store.history("acted") == []
