"""`fastgen eval` and `fastgen bench` end to end on the zoo teachers (small image counts)."""

import json

import pytest
import torch

from fastgen.cli import main
from fastgen.eval.evaluate import evaluate
from fastgen.pipelines.export import export_student


def test_eval_writes_metrics_table_and_grid(tmp_path, capsys):
    from fastgen import zoo

    out = tmp_path / "ev"
    assert main(["eval", "fmnist-ldm", "--steps", "2", "--num-images", "100", "--out", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    m = result["metrics"]
    domain = ("fd", "kid", "fd_class", "fd_pixel", "precision", "recall", "density", "coverage")
    assert {*domain, *(f"{k}_floor" for k in domain), "acc", "images_per_s", "s_per_image", "peak_memory_mb"} <= set(m)
    assert m["nfe"] == 2 and result["guidance"] == zoo.RECOMMENDED_GUIDANCE["fmnist-ldm"] and 0 <= m["acc"] <= 1
    assert m["n_prdc"] == 100 and sorted(m["fd_by_class"]) == [str(c) for c in range(10)]
    # the floors: real train images at the same N and classes (precision/recall of real data are high)
    assert m["fd_floor"] < m["fd"] and m["fd_class_floor"] < m["fd_class"] and m["recall_floor"] > 0.5
    table = (out / "metrics.md").read_text()
    assert (out / "samples.png").is_file() and all(f"| {k} |" in table for k in domain)
    assert "| recall |" in capsys.readouterr().out


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


def test_training_metrics_on_an_unconditional_teacher_skip_the_class_metrics():
    from fastgen.eval.evaluate import TRAINING_METRICS

    result = evaluate("digits-ddpm", steps=2, num_images=20, metrics=TRAINING_METRICS, progress=False)
    m = result["metrics"]
    assert {"fd", "fd_pixel", "precision", "recall", "coverage"} <= set(m)
    assert "fd_class" not in m and "acc" not in m  # digits-ddpm is unconditional
    assert m["n_prdc"] == 20 and 0 <= m["recall"] <= 1 and 0 <= m["recall_floor"] <= 1


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


def test_unconditional_loop_equals_exported_students_call(tmp_path):
    """An exported digits student is a ConsistencyModelPipeline: the evaluation loop gives its images, with
    step counts and with custom timesteps (the call fastgen eval makes from its fastgen.json)."""
    from diffusers import DiffusionPipeline

    from fastgen import zoo
    from fastgen.eval.evaluate import student_call
    from fastgen.eval.generate import unconditional_call
    from fastgen.pipelines.export import export_student

    teacher = DiffusionPipeline.from_pretrained(zoo.path("digits-ddpm"))
    for timesteps in ([749], [625, 300]):
        pipe = DiffusionPipeline.from_pretrained(export_student(teacher, tmp_path / str(len(timesteps)),
                                                                timesteps=timesteps))
        call = student_call(pipe)
        ours = unconditional_call(pipe, 4, call.get("steps"), torch.Generator().manual_seed(0), call.get("timesteps"))
        kwargs = {"timesteps": timesteps, "num_inference_steps": None} if "timesteps" in call else \
            {"num_inference_steps": call["steps"]}
        theirs = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_bench_writes_table_and_plot(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "digits-ddpm", "--solvers", "ddim,unipc,euler", "--nfes", "1,2", "--num-images", "20",
                 "--out", str(out)]) == 0
    table = (out / "bench.md").read_text()
    assert table.count("| ddim |") == 2 and "| euler |" in table and "real data" in table
    assert "| recall |" in table and "| coverage |" in table and "per-class FD" not in table  # unconditional
    result = json.loads((out / "bench.json").read_text())
    assert all(0 <= r["recall"] <= 1 for r in result["rows"]) and "recall" in result["floor"]
    assert (out / "bench.png").stat().st_size > 1000


def test_eval_with_gamma_samples_as_tcd(tmp_path):
    """--gamma: the plain call with TCDScheduler and eta (text) or the evaluation loop's (unconditional) gives
    FewStepPipeline(gamma=G)'s images -- fastgen's sample_tcd -- and the command records it."""
    from diffusers import DiffusionPipeline

    from fastgen import zoo
    from fastgen.eval.generate import generate, tcd_scheduler
    from fastgen.pipelines import FewStepPipeline

    for name in ("digits-ddpm", "fmnist-ldm"):
        folder = export_student(DiffusionPipeline.from_pretrained(zoo.path(name)), tmp_path / name,
                                timesteps=[999, 759, 499], extra_metadata={"teacher": name})
        pipe = DiffusionPipeline.from_pretrained(folder)
        pipe.scheduler = tcd_scheduler(pipe.scheduler)
        gen = generate(pipe, 4, timesteps=[999, 759, 499], guidance_scale=0.0, batch_size=4, progress=False, eta=0.5)
        text = {"prompt": zoo.prompts()[:4]} if name == "fmnist-ldm" else {"batch_size": 4}
        want = FewStepPipeline.from_pretrained(folder)(**text, gamma=0.5, output_type="pt",
                                                       generator=torch.Generator().manual_seed(0)).images
        torch.testing.assert_close(gen.images, want, atol=1e-5, rtol=0)
    out = tmp_path / "ev"
    assert main(["eval", str(tmp_path / "fmnist-ldm"), "--gamma", "0.5", "--num-images", "20", "--metrics", "fd",
                 "--out", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["scheduler"] == "TCDScheduler" and result["gamma"] == 0.5 and result["call"]["eta"] == 0.5
    assert result["call"]["timesteps"] == [999, 759, 499]


def test_eval_with_eta_samples_as_diffusers_ddim(tmp_path):
    """--eta: DDIM's stochastic sampling as diffusers runs it -- the evaluation loop gives DDIMPipeline(eta=E)'s
    images -- for text pipelines passed as the call's eta, recorded, and not the deterministic images."""
    from diffusers import DDIMPipeline, DDIMScheduler, DiffusionPipeline

    from fastgen import zoo
    from fastgen.eval.generate import generate

    teacher = DiffusionPipeline.from_pretrained(zoo.path("digits-ddpm"))
    ddim = DDIMPipeline(unet=teacher.unet, scheduler=DDIMScheduler.from_config(teacher.scheduler.config))
    for eta in (0.0, 1.0):
        gen = generate(ddim, 4, num_inference_steps=4, batch_size=4, progress=False, eta=eta)
        want = ddim(batch_size=4, num_inference_steps=4, eta=eta, generator=torch.Generator().manual_seed(0),
                    output_type="np").images
        torch.testing.assert_close(gen.images, torch.from_numpy(want).permute(0, 3, 1, 2).float(), atol=1e-5, rtol=0)
    assert gen.call["eta"] == 1.0
    assert (gen.images - generate(ddim, 4, num_inference_steps=4, batch_size=4, progress=False).images).abs().max() > 0.1
    rows = {}
    for eta in ("0", "1"):
        out = tmp_path / f"eta{eta}"
        assert main(["eval", "fmnist-ldm", "--solver", "ddim", "--steps", "4", "--eta", eta, "--num-images", "20",
                     "--metrics", "fd", "--out", str(out)]) == 0
        rows[eta] = json.loads((out / "metrics.json").read_text())
        assert rows[eta]["eta"] == float(eta) and rows[eta]["call"]["eta"] == float(eta)
    assert rows["0"]["metrics"]["fd"] != rows["1"]["metrics"]["fd"]


@pytest.mark.parametrize("argv, message", [
    (["eval", "no-such-teacher", "--steps", "1"], "neither a zoo teacher"),
    (["eval", "fmnist-ldm"], "--steps"),
    (["eval", "fmnist-ldm", "--steps", "1", "--metrics", "fd,bogus"], "Unknown metric"),
    (["eval", "fmnist-ldm", "--steps", "1", "--num-images", "5", "--metrics", "fd"], "at least"),
    (["eval", "fmnist-ldm", "--steps", "1", "--num-images", "50"], "fd_class needs at least 10 images per class"),
    (["eval", "digits-ddpm", "--steps", "1", "--num-images", "5", "--metrics", "recall"],
     "recall: at least 10 images needed"),
    (["bench", "fmnist-ldm", "--num-images", "50"], "fd_class needs at least 10 images per class"),
    (["eval", "fmnist-ldm", "--steps", "1", "--num-images", "10", "--metrics", "fid"], "--fid-reference"),
    (["eval", "digits-ddpm", "--steps", "1", "--gamma", "1.5"], "gamma (TCD's stochasticity) must be a number in [0, 1]"),
    (["eval", "digits-ddpm", "--steps", "1", "--gamma", "0.3", "--solver", "ddim"], "give one of them"),
    (["eval", "digits-ddpm", "--steps", "1", "--eta", "-0.5"], "--eta (DDIM's stochasticity) must be a number in [0, 1]"),
    (["eval", "digits-ddpm", "--steps", "1", "--eta", "0.5", "--gamma", "0.3"], "give one of them"),
    (["eval", "digits-ddpm", "--steps", "1", "--eta", "0.5"], "--eta: DDPMScheduler.step takes no eta"),
    (["eval", "digits-ddpm", "--steps", "1", "--eta", "0.5", "--solver", "unipc"], "takes no eta; DDIMScheduler does"),
    (["eval", "digits-ddpm", "--steps", "1", "--seeds", "3"], "--seeds expects two or more distinct"),
    (["eval", "digits-ddpm", "--steps", "1", "--seeds", "0,1,0"], "--seeds expects two or more distinct"),
    (["eval", "digits-ddpm", "--steps", "1", "--seeds", "0,-1"], "--seeds expects two or more distinct"),
    (["eval", "digits-ddpm", "--steps", "1", "--seeds", "0,x"], "--seeds expects comma-separated whole numbers"),
    (["eval", "digits-ddpm", "--steps", "1", "--seed", "2", "--seeds", "0,1"], "--seed 2 and --seeds 0,1"),
])
def test_eval_bad_input_is_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_eval_over_seeds_reports_each_seed_and_their_mean(tmp_path):
    """--seeds: one row per seed, each the same as a --seed evaluation, and their mean +- sample sd."""
    import statistics

    out = tmp_path / "ev"
    argv = ["eval", "digits-ddpm", "--steps", "2", "--num-images", "20", "--metrics", "fd,recall,speed"]
    assert main([*argv, "--seeds", "0,1,2", "--out", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    rows = result["metrics_by_seed"]
    assert result["seeds"] == [0, 1, 2] and result["seed"] is None and len(rows) == 3
    alone = evaluate("digits-ddpm", steps=2, num_images=20, metrics=["fd", "recall"], seed=1, progress=False)
    assert rows[1]["fd"] == pytest.approx(alone["metrics"]["fd"], rel=1e-6)
    assert rows[1]["recall"] == alone["metrics"]["recall"]
    fds = [row["fd"] for row in rows]
    assert len(set(fds)) == 3  # the seed moves FD at 20 images
    assert result["metrics"]["fd"] == pytest.approx(statistics.fmean(fds))
    assert result["metrics_sd"]["fd"] == pytest.approx(statistics.stdev(fds)) and result["metrics_sd"]["fd"] > 0
    # what does not change with the seed stays as it is: the step count and the real-data floor
    assert result["metrics"]["nfe"] == 2 and result["metrics_sd"]["fd_floor"] == 0.0
    table = (out / "metrics.md").read_text()
    assert "| metric | mean +- sd | seed 0 | seed 1 | seed 2 | real-data floor |" in table
    assert f"| fd | {result['metrics']['fd']:.4f} +- {result['metrics_sd']['fd']:.4f} | {fds[0]:.4f} |" in table
    assert (out / "samples.png").is_file()


def test_eval_folder_without_pipeline(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--steps", "1"]) == 2
    assert "model_index.json" in capsys.readouterr().err
