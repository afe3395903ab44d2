"""The command's vocabulary and the Python API: one meaning per option name, deprecated spellings that warn,
`fastgen export`, `--resume [CHECKPOINT]`, a run's recipe.json passed back, outputs outside the installed package,
and fastgen.train / fastgen.evaluate / fastgen.export on tiny teachers."""

import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_ddpm, tiny_recipe
from safetensors.torch import load_file

import fastgen
import fastgen.zoo
from fastgen.cli import build_parser, main
from fastgen.pipelines.export import read_metadata
from fastgen.train.recipes import load_recipe
from fastgen.train.runner import default_out

ZOO = Path(fastgen.zoo.__file__).parent


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_tiny_ddpm(tmp_path_factory.mktemp("cli") / "teacher")


@pytest.fixture
def recipe(tmp_path):
    return tiny_recipe(tmp_path / "tiny.toml", ema_decay=0.5)  # 6 steps, checkpoints at 3 and 6, logs at 2, 4, 6


def unet(folder: Path) -> dict:
    return load_file(str(next((Path(folder) / "unet").glob("*.safetensors"))))


def test_one_vocabulary_and_deprecated_spellings(capsys):
    parser = build_parser()
    for cmd in ("demo", "eval", "bench"):  # every command that samples
        extra = ["x"] if cmd in ("eval", "bench") else []
        args = parser.parse_args([cmd, *extra, "--seed", "3", "--device", "cuda:1", "--prompts", "p.txt"])
        assert (args.seed, args.device, args.prompts) == (3, "cuda:1", "p.txt")
    args = parser.parse_args(["eval", "x", "--steps", "4"])  # sampling steps: both spellings, no warning
    assert args.num_inference_steps == 4 and parser.parse_args(["eval", "x", "--num-inference-steps", "2"]
                                                               ).num_inference_steps == 2
    assert capsys.readouterr().err == ""
    args = parser.parse_args(["train", "r", "--train-steps", "7", "--seed", "1", "--prompts", "zoo"])
    assert (args.train_steps, args.seed, args.prompts) == (7, 1, "zoo")
    assert parser.parse_args(["demo", "--steps", "5"]).train_steps == 5  # training steps: old spelling warns
    assert "--steps is deprecated here; use --train-steps" in capsys.readouterr().err
    args = parser.parse_args(["zoo", "train", "digits-ddpm", "--steps", "3", "--vae-steps", "2"])
    assert (args.train_steps, args.vae_train_steps) == (3, 2)
    err = capsys.readouterr().err
    assert "use --train-steps" in err and "use --vae-train-steps" in err
    for cmd in (["demo"], ["zoo", "train", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args([*cmd, "--help"])
        assert "--steps" not in capsys.readouterr().out.replace("--train-steps", "").replace("--vae-train-steps", "")
    assert parser.parse_args(["train", "r", "--resume"]).resume is True
    assert parser.parse_args(["train", "r", "--resume", "runs/x/checkpoints/checkpoint-0000003"]).resume.endswith("03")


def test_export_a_run_or_a_checkpoint_without_training(teacher, recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", recipe, "--teacher", str(teacher), "--out", str(run)]) == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert main(["export", str(run)]) == 0  # the latest checkpoint: the trained student, EMA weights included
    again, trained = unet(run / "student-step-0000006"), unet(run / "student")
    assert all(torch.equal(again[k], trained[k]) for k in trained)
    assert main(["export", str(run / "checkpoints" / "checkpoint-0000003"), "--out", str(tmp_path / "s3")]) == 0
    early = unet(tmp_path / "s3")
    assert any(not torch.equal(early[k], trained[k]) for k in trained)
    meta = read_metadata(tmp_path / "s3")
    assert meta["train_steps"] == 3 and meta["method"] == "dmd2"
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the run itself is left as it was
    assert "exported" in capsys.readouterr().out


def test_resume_from_a_checkpoint_with_the_runs_recipe_json(teacher, recipe, tmp_path, capsys):
    """`fastgen train RUN/recipe.json --resume RUN/checkpoints/checkpoint-N` (the run folder is the default --out)
    ends as the uninterrupted run; the change of train.steps is recorded and the log keeps the first part."""
    whole = tmp_path / "whole"
    assert main(["train", recipe, "--teacher", str(teacher), "--out", str(whole)]) == 0
    part = tmp_path / "part"
    assert main(["train", recipe, "--teacher", str(teacher), "--out", str(part), "--train-steps", "3"]) == 0
    saved = part / "recipe.json"
    assert default_out(saved, load_recipe(saved)) == part
    assert main(["train", str(saved), "--resume", str(part / "checkpoints" / "checkpoint-0000003"),
                 "--train-steps", "6"]) == 0
    a, b = unet(whole / "student"), unet(part / "student")
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumes = [json.loads(line) for line in (part / "resumes.jsonl").read_text().splitlines()]
    assert [(r["checkpoint"], r["step"], r["changed"]) for r in resumes] == [
        ("checkpoint-0000003", 3, {"train.steps": [3, 6]})]
    assert json.loads(saved.read_text())["train"]["steps"] == 6
    assert "train.steps 3 -> 6" in capsys.readouterr().out  # the changed key is said, not only recorded
    log = json.loads((part / "train_log.json").read_text())
    assert [r["step"] for r in log["history"]] == [2, 4, 6] and log["start_step"] == 3


def test_zoo_train_and_classifier_write_to_the_working_folder_by_default(tmp_path, monkeypatch):
    from test_faults import snapshot

    monkeypatch.chdir(tmp_path)
    installed = snapshot(ZOO)
    assert main(["zoo", "train", "digits-ddpm", "--train-steps", "2", "--batch-size", "8", "--no-card"]) == 0
    assert (tmp_path / "zoo" / "digits-ddpm" / "model_index.json").is_file()
    assert main(["classifier", "digits", "--epochs", "1"]) == 0
    assert (tmp_path / "zoo" / "classifiers" / "digits" / "model.safetensors").is_file()
    assert snapshot(ZOO) == installed


def test_python_api_train_export_evaluate(teacher, recipe, tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import fastgen, sys; fastgen.train; fastgen.export; "
                          "print('torch' in sys.modules)"], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False"  # looking the API up imports nothing heavy
    student = fastgen.train(recipe, out=tmp_path / "run", overrides={"train.steps": 4, "student.ema_decay": 0.0},
                            teacher=str(teacher))
    assert student == tmp_path / "run" / "student" and (student / "model_index.json").is_file()
    assert json.loads((tmp_path / "run" / "recipe.json").read_text())["train"]["steps"] == 4
    exported = fastgen.export(tmp_path / "run", out=tmp_path / "again")
    a, b = unet(student), unet(exported)
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = fastgen.evaluate(exported, num_images=4, metrics="speed", batch_size=2)
    assert metrics["nfe"] == 1 and metrics["speed_images"] == 2  # the first (warm-up) call is not timed
    metrics = fastgen.evaluate("fmnist-ldm", num_inference_steps=2, num_images=10, metrics=["fd", "speed"],
                               prompts=["a photo of a bag", "a photo of a coat"], guidance_scale=1.0)
    assert metrics["fd"] > 0 and metrics["nfe"] == 2 and "acc" not in metrics
    assert callable(fastgen.train) and fastgen.PipelineSampler.__name__ == "PipelineSampler"
