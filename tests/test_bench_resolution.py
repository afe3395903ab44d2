"""`fastgen bench` on a Flux teacher runs every row at one size: the students' trained resolution (their
``fastgen.json``), not FluxPipeline's default 128 latents, or ``--resolution`` pixels. Checked on a tiny Flux
pipeline built from diffusers' classes (VAE factor 2: FluxPipeline's default is 256 pixels here) and its 2-step
student trained at 16 pixels, by the size of the images each row generated; bad sizes are one-line exit-2 errors
before the first image."""

import json

import pytest
from conftest import flow_student, save_tiny_ddpm

import fastgen.eval.bench as bench_module
from fastgen.cli import main


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """``(teacher folder, student folder trained at 16 pixels, prompt file)``."""
    root = tmp_path_factory.mktemp("bench_flux")
    pipe, _, student = flow_student(root, "flux", 3.5)
    pipe.save_pretrained(root / "teacher")  # saved with FluxPipeline's default size: 128 latents
    prompts = root / "prompts.txt"
    prompts.write_text("a photo of a sneaker\na photo of a bag\n")
    return root / "teacher", student, prompts


@pytest.fixture
def sizes(monkeypatch):
    """The image size (pixels) of each bench row, in order, read from the images the row generated."""
    seen = []
    run_one = bench_module.run_one

    def recording(*args, **kwargs):
        row, gen = run_one(*args, **kwargs)
        seen.append(tuple(gen.images.shape[-2:]))
        return row, gen

    monkeypatch.setattr(bench_module, "run_one", recording)
    return seen


def bench_argv(teacher, prompts, out, *extra):
    return ["bench", str(teacher), "--num-images", "2", "--batch-size", "2", "--nfes", "1,2", "--solvers", "euler",
            "--metrics", "speed", "--prompts", str(prompts), "--out", str(out), *extra]


def test_the_teachers_rows_run_at_the_students_trained_resolution(flux, sizes, tmp_path, capsys):
    teacher, student, prompts = flux
    assert main(bench_argv(teacher, prompts, tmp_path / "b", "--students", str(student))) == 0
    assert sizes == [(16, 16)] * 3  # euler at NFE 1 and 2, then the student
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert result["resolution"] == 16 and [r["kind"] for r in result["rows"]] == ["teacher", "teacher", "student"]


@pytest.mark.parametrize("pixels", [8, 32])
def test_resolution_sets_the_size_of_a_teacher_benched_alone(flux, sizes, tmp_path, pixels):
    teacher, _, prompts = flux
    assert main(bench_argv(teacher, prompts, tmp_path / "b", "--resolution", str(pixels))) == 0
    assert sizes == [(pixels, pixels)] * 2


def test_without_students_or_resolution_the_teacher_keeps_its_pipelines_default(flux, sizes, tmp_path):
    teacher, _, prompts = flux
    assert main(bench_argv(teacher, prompts, tmp_path / "b", "--nfes", "1")) == 0
    assert sizes == [(256, 256)]  # FluxPipeline's 128 latents, VAE factor 2


@pytest.mark.parametrize("extra, message", [
    (["--resolution", "18"], "--resolution = 18 must be a multiple of 4 (the VAE's factor 2 times the "
                             "network's patch 2) for FluxPipeline"),
    (["--resolution", "0"], "--resolution must be a positive whole number of pixels, got 0"),
    (["--resolution", "32", "--students", "{student}"], "--resolution 32: student(s) {student} (16) were trained at "
                                                         "another resolution"),
    (["--resolution", "16", "--teacher-ddpm"], "--resolution applies to pipelines whose call defaults to "
                                               "default_sample_size (SDXL, SD3, Flux); DDPMPipeline generates at"),
])
def test_bad_resolution_is_one_line_exit_2_before_any_image(flux, sizes, extra, message, tmp_path, capsys):
    teacher, student, prompts = flux
    if "--teacher-ddpm" in extra:
        extra = [e for e in extra if e != "--teacher-ddpm"]
        teacher = save_tiny_ddpm(tmp_path / "ddpm")
        argv = ["bench", str(teacher), "--num-images", "2", "--nfes", "1", "--metrics", "speed", "--out",
                str(tmp_path / "b"), *extra]
    else:
        argv = bench_argv(teacher, prompts, tmp_path / "b", *[e.format(student=student) for e in extra])
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastgen bench: error: "), lines
    assert message.format(student=student) in lines[0]
    assert sizes == [] and not (tmp_path / "b").exists()
