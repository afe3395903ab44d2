"""`fastgen eval` and `fastgen bench` end to end on the zoo teachers (small image counts)."""

import json

import pytest
import torch

from fastgen.cli import main
from fastgen.eval.evaluate import evaluate
from fastgen.pipelines.export import export_student


def test_eval_writes_metrics_table_and_grid(tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", "fmnist-ldm", "--steps", "2", "--num-images", "30", "--out", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    m = result["metrics"]
    assert {"fd", "fd_floor", "kid", "kid_floor", "acc", "images_per_s", "s_per_image", "peak_memory_mb"} <= set(m)
    assert m["nfe"] == 2 and result["guidance"] == 3.0 and 0 <= m["acc"] <= 1
    assert (out / "samples.png").is_file() and "| fd |" in (out / "metrics.md").read_text()
    assert "| fd |" in capsys.readouterr().out


def test_metric_ranks_teacher_steps_like_the_eye():
    """50 DDIM steps must score better than 1 step (blurry class averages) on the same noise."""
    one = evaluate("fmnist-ldm", steps=1, solver="ddim", num_images=200, metrics=["fd", "acc"], progress=False)
    fifty = evaluate("fmnist-ldm", steps=50, solver="ddim", num_images=200, metrics=["fd", "acc"], progress=False)
    assert fifty["metrics"]["fd"] < 0.5 * one["metrics"]["fd"]
    assert fifty["metrics"]["acc"] > 0.8


def test_eval_of_an_exported_student_uses_its_metadata(tmp_path):
    from diffusers import DiffusionPipeline

    from fastgen import zoo

    teacher = DiffusionPipeline.from_pretrained(zoo.path("digits-ddpm"))
    folder = export_student(teacher, tmp_path / "student", timesteps=[999, 499], method="test",
                            extra_metadata={"teacher": "digits-ddpm"})
    result = evaluate(str(folder), num_images=20, metrics=["fd", "speed"], progress=False)
    assert result["zoo"] == "digits-ddpm" and result["metrics"]["nfe"] == 2


def test_unconditional_loop_equals_ddpm_pipeline_call(tmp_path):
    """The evaluation loop for DDPMPipeline gives the pipeline's own images with LCM and DDIM schedulers."""
    from diffusers import DDIMScheduler, DiffusionPipeline, LCMScheduler

    from fastgen import zoo
    from fastgen.eval.generate import unconditional_call

    pipe = DiffusionPipeline.from_pretrained(zoo.path("digits-ddpm"))
    for cls in (LCMScheduler, DDIMScheduler):
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
        ours = unconditional_call(pipe, 4, 2, torch.Generator().manual_seed(0))
        theirs = pipe(batch_size=4, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
        torch.testing.assert_close(ours, torch.from_numpy(theirs).permute(0, 3, 1, 2), atol=1e-5, rtol=0)


def test_bench_writes_table_and_plot(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "digits-ddpm", "--solvers", "ddim,unipc,euler", "--nfes", "1,2", "--num-images", "20",
                 "--out", str(out)]) == 0
    table = (out / "bench.md").read_text()
    assert table.count("| ddim |") == 2 and "| euler |" in table and "real data" in table
    assert (out / "bench.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["eval", "no-such-teacher", "--steps", "1"], "neither a zoo teacher"),
    (["eval", "fmnist-ldm"], "--steps"),
    (["eval", "fmnist-ldm", "--steps", "1", "--metrics", "fd,bogus"], "Unknown metric"),
    (["eval", "fmnist-ldm", "--steps", "1", "--num-images", "5", "--metrics", "fd"], "at least"),
    (["eval", "fmnist-ldm", "--steps", "1", "--num-images", "10", "--metrics", "fid"], "--fid-reference"),
])
def test_eval_bad_input_is_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_eval_folder_without_pipeline(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--steps", "1"]) == 2
    assert "model_index.json" in capsys.readouterr().err
