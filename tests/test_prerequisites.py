"""A recipe's prerequisite runs (``ConstrainedScriptArguments.prerequisites``): one ``steer train constrained``
trains the adapters the recipe names first, in order, skips the finished ones when run again, and refuses bad
entries with one line naming the entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.cli import fails
from helpers.launch import constrained_args

from steer import cli
from steer.scripts.prerequisites import finished_run, prerequisite_argv, prerequisite_runs

FIELD = "ConstrainedScriptArguments.prerequisites"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[{", "is not valid JSON"),
        ({"output_dir": "a"}, "must be a list of mappings"),
        (["a"], r"\[0\] must be a mapping"),
        ([{"kl_coef": 0}], r"\[0\] needs its own output_dir"),
        (
            [{"output_dir": "a", "resume_from_checkpoint": "x"}],
            r"\[0\]\.resume_from_checkpoint: set by steer",
        ),
        ([{"output_dir": "a"}, {"output_dir": "b", "seed": None}], r"\[1\]\.seed is null"),
        ([{"output_dir": "a"}, {"output_dir": "a", "seed": 1}], "share an output_dir"),
    ],
)
def test_prerequisite_runs_bad_input(value, message):
    with pytest.raises(ValueError, match=message):
        prerequisite_runs(value, FIELD)


def test_prerequisite_runs_and_argv(tmp_path):
    assert prerequisite_runs(None, FIELD) == [] == prerequisite_runs(" ", FIELD)
    runs = prerequisite_runs(json.dumps([{"output_dir": str(tmp_path / "a"), "kl_coef": 0}]), FIELD)
    run = {
        **runs[0],
        "use_peft": True,
        "constraint_kwargs": {"topic": "x"},
        "lora_target_modules": ["q", "v"],
    }
    recipe = ["--config", "r.yaml", "--seed", "3", "--output_dir", "main"]
    argv = prerequisite_argv(recipe, run)
    assert argv[:6] == recipe  # the recipe's own arguments, then the run's overrides
    tail = argv[6:]
    assert tail[tail.index("--output_dir") + 1] == str(tmp_path / "a")
    assert tail[tail.index("--kl_coef") + 1] == "0" and tail[tail.index("--use_peft") + 1] == "true"
    assert json.loads(tail[tail.index("--constraint_kwargs") + 1]) == {"topic": "x"}
    assert tail[tail.index("--lora_target_modules") + 1 :][:2] == ["q", "v"]
    assert tail[-4:] == ["--resume_from_checkpoint", "", "--prerequisites", "[]"]  # nothing to resume yet
    (tmp_path / "a" / "checkpoint-2").mkdir(parents=True)
    assert not finished_run(tmp_path / "a")  # checkpoints only: an interrupted run, resumed
    assert prerequisite_argv([], run)[-4:] == ["--resume_from_checkpoint", "latest", "--prerequisites", "[]"]
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    assert finished_run(tmp_path / "a")


def _recipe(model_dir: Path, tmp_path: Path, prerequisites: list[dict], *extra: str) -> list[str]:
    return [
        *constrained_args(tmp_path, model_dir, banned=("the", "bad")),
        "--guidance_context_prior",
        "none",
        "--max_steps",
        "2",
        "--samples_per_round",
        "4",
        "--sample_max_new_tokens",
        "4",
        "--output_dir",
        str(tmp_path / "main"),
        "--prerequisites",
        json.dumps(prerequisites),
        *extra,
    ]


def test_one_command_trains_the_prerequisites_first(tiny_model_dir, tmp_path, one_thread, caplog):
    ref, init = str(tmp_path / "ref"), str(tmp_path / "init")
    runs = [{"output_dir": init, "kl_coef": 0}, {"output_dir": ref, "kl_coef": 0, "learning_rate": 0.05}]
    argv = _recipe(
        tiny_model_dir, tmp_path, runs, "--kl_reference", "base", "--kl_reference_adapter", ref,
        "--policy_init_adapter", init, "--policy_export_weight", "0.5",
    )  # fmt: skip
    with caplog.at_level("INFO", logger="steer"):
        assert cli.main(argv) == 0
    assert finished_run(ref) and finished_run(init) and finished_run(tmp_path / "main")
    assert caplog.text.count("KL reference: the adapter of") == 1  # the twins (kl_coef 0) ignore it
    assert "prerequisite 1/2: training" in caplog.text and "prerequisite 2/2" in caplog.text
    exported = json.loads((tmp_path / "main" / "adapter_config.json").read_text())  # halfway back to init
    kept = json.loads((tmp_path / "main" / "trained_policy" / "adapter_config.json").read_text())
    assert exported["r"] == 2 * kept["r"] and f"0.5 x the adapter of {init}" in caplog.text
    stamps = {p: (Path(p) / "adapter_model.safetensors").stat().st_mtime_ns for p in (ref, init)}

    caplog.clear()
    with caplog.at_level("INFO", logger="steer"):  # again: nothing retrained, the main run replaced
        assert cli.main([*argv, "--overwrite_output_dir", "true"]) == 0
    assert "2 of 2 already finished" in caplog.text and "prerequisite 1/" not in caplog.text
    assert stamps == {p: (Path(p) / "adapter_model.safetensors").stat().st_mtime_ns for p in (ref, init)}

    caplog.clear()  # a prerequisite trained on its own (the recipe's twin command): it is this run, not before it
    twin = _recipe(tiny_model_dir, tmp_path, runs, "--kl_coef", "0", "--output_dir", str(tmp_path / "twin"))
    twin_runs = [*runs, {"output_dir": str(tmp_path / "twin"), "kl_coef": 0}]
    twin[twin.index("--prerequisites") + 1] = json.dumps(twin_runs)
    with caplog.at_level("INFO", logger="steer"):
        assert cli.main(twin) == 0
    assert finished_run(tmp_path / "twin") and "prerequisite 1/" not in caplog.text


def test_a_bad_prerequisite_fails_before_any_training(tiny_model_dir, tmp_path, capsys):
    runs = [
        {"output_dir": str(tmp_path / "a"), "kl_coef": 0},
        {"output_dir": str(tmp_path / "b"), "kl_cof": 0},
    ]
    fails(capsys, _recipe(tiny_model_dir, tmp_path, runs), "prerequisite run", "kl_cof")
    assert not (tmp_path / "a").exists()
    # this run's output_dir holds another run: refused before the prerequisites train
    (tmp_path / "main").mkdir()
    (tmp_path / "main" / "adapter_config.json").write_text("{}")
    fails(capsys, _recipe(tiny_model_dir, tmp_path, runs[:1]), "overwrite_output_dir")
    assert not (tmp_path / "a").exists()
    fails(capsys, _recipe(tiny_model_dir, tmp_path, [{"kl_coef": 0}]), f"{FIELD}[0] needs its own output_dir")
