"""`fastgen demo` end to end with a tiny budget: distill, export, evaluate, table, grid."""

import json

from diffusers import DiffusionPipeline

from fastgen.cli import main
from fastgen.pipelines.export import read_metadata


def test_demo_distills_exports_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--train-steps", "4", "--num-images", "10", "--out", str(out)]) == 0
    result = json.loads((out / "demo.json").read_text())
    assert [r["steps"] for r in result["rows"]] == [50, 1, 1]
    assert all(r["fd"] > 0 and 0 <= r["acc"] <= 1 for r in result["rows"])
    assert result["rows"][2]["speedup"] > 1  # one student step is faster than 50 teacher steps
    assert (out / "comparison.png").stat().st_size > 1000
    assert "| DMD2 student | 1 |" in capsys.readouterr().out
    pipe = DiffusionPipeline.from_pretrained(result["student"])  # the exported student is plain diffusers
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    assert read_metadata(pipe.name_or_path)["timesteps"] == [749]  # the recipe's generator timestep
    pipe.scheduler.set_timesteps(1)  # a plain `pipe(prompt, num_inference_steps=1)` runs the network at 749
    assert pipe.scheduler.timesteps.tolist() == [749]


def test_demo_checks_fashion_mnist_before_training(tmp_path, monkeypatch, capsys):
    from fastgen.zoo import data

    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "missing")
    assert main(["demo", "--train-steps", "2", "--num-images", "10", "--out", str(tmp_path / "demo")]) == 2
    assert "Fashion-MNIST not found" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()  # nothing trained, nothing written
