"""``student.init``: a run's student starts from an earlier run's exported student (SiD²A, multi-stage DMD2).

On tiny real teachers: a 2-step DMD2 run exports a student; a second run (SiD, DMD2, CD) given that run folder
starts with exactly its weights (its critic and everything else from the teacher), records the folder in
``recipe.json`` and its digest in ``teacher.json``, and resumes bit-exactly. Guidance-embedded (LCM) students start
only from students with the same embedding. Bad input -- a missing folder, another network class or config, another
parameterisation, a LoRA student, an init folder changed before ``--resume`` -- is a one-line exit-2 error of
``fastgen train`` that changes nothing.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (assert_resumes_exactly, perturbed, save_tiny_ddpm, snapshot, tiny_recipe, tiny_sd_pipeline,
                      tiny_unet)
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline
from safetensors.torch import load_file

from fastgen.cli import main
from fastgen.guidance_embedding import guidance_conditioned_network
from fastgen.methods import DMD2
from fastgen.pipelines.export import export_student
from fastgen.train.recipes import load_recipe
from fastgen.train.runner import build_run, run_training


def folder_weights(folder: Path, network: str = "unet") -> dict:
    return load_file(str(next((folder / network).glob("*.safetensors"))))


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("student_init")


@pytest.fixture(scope="module")
def teacher(root):
    return save_tiny_ddpm(root / "teacher")


@pytest.fixture(scope="module")
def recipe(root):
    """DMD2 without a [dmd2] section (``--set method=...`` switches the method; DMD2 runs pass dmd2.ratio=2)."""
    return Path(tiny_recipe(root / "tiny.toml", ratio=None, steps=4, checkpoint_every=2))


@pytest.fixture(scope="module")
def first(root, teacher, recipe, one_thread):
    """A first run (2 DMD2 steps): its folder, whose student/ the later runs start from."""
    run_training(str(recipe), ["dmd2.ratio=2", "train.steps=2"], teacher=str(teacher), out=str(root / "first"))
    return root / "first"


def built(recipe, teacher, out, overrides):
    cfg = load_recipe(str(recipe), overrides)
    cfg.teacher = str(teacher)
    return build_run(cfg, out, allow_pickle=False, resumed=False, trackers=False)


@pytest.mark.parametrize("method", ["sid", "dmd2", "cd"])
def test_the_student_starts_with_the_init_folders_weights_and_the_critic_from_the_teacher(
        method, first, teacher, recipe, tmp_path):
    init = folder_weights(first / "student")
    teacher_weights = folder_weights(teacher)
    assert any(not torch.equal(init[k], teacher_weights[k]) for k in init)  # the first run moved the student
    chosen = (recipe, [f"method={method}"]) if method != "cd" else ("cd_digits", [])  # the tiny recipe has a critic
    _, identity, model, trainer = built(chosen[0], teacher, tmp_path / "run", [*chosen[1], f"student.init={first}"])
    student = model.student.model.state_dict()
    assert student.keys() == init.keys() and all(torch.equal(student[k], init[k]) for k in init)
    teacher_now = model.teacher.model.state_dict()
    assert all(torch.equal(teacher_now[k], teacher_weights[k]) for k in teacher_weights)  # the teacher untouched
    if method in ("sid", "dmd2"):
        critic = model.critic.denoiser.model.state_dict()
        assert all(torch.equal(critic[k], teacher_weights[k]) for k in teacher_weights)
    else:  # a consistency model's target network copies the student as it starts: the init's weights
        target = model.target.model.state_dict()
        assert all(torch.equal(target[k], init[k]) for k in init)
    assert identity["student_init"]["folder"] == str(first) and len(identity["student_init"]["network"]) == 16
    trainer.end()


def test_a_run_from_a_student_folder_records_it_and_resumes_exactly(first, teacher, recipe, root, one_thread):
    overrides = ["dmd2.ratio=2", f"student.init={first / 'student'}"]
    whole = assert_resumes_exactly(DMD2, recipe, teacher, root / "resume", stops=[3], overrides=overrides)
    assert json.loads((whole / "recipe.json").read_text())["student"]["init"] == str(first / "student")
    record = json.loads((whole / "teacher.json").read_text())["student_init"]
    assert record["folder"] == str(first / "student")
    resumed = json.loads((root / "resume" / "stop3" / "teacher.json").read_text())["student_init"]
    assert resumed == record


def test_guidance_embedded_students_start_only_from_students_with_the_same_embedding(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path / "teacher")
    pipe.save_pretrained(tmp_path / "teacher")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a bag\n")
    guided = guidance_conditioned_network(pipe.unet)
    with torch.no_grad():
        guided.time_embedding.cond_proj.weight.normal_()  # a trained embedding, not the zero it starts as
    export_student(pipe, tmp_path / "lcm", model=guided, timesteps=[999], method="lcm", guidance_scale=2.0)
    export_student(pipe, tmp_path / "plain", model=perturbed(pipe.unet), timesteps=[999], method="dmd2")
    lcm = [f"data.prompts={prompts}", "train.batch_size=2"]
    _, _, model, trainer = built("lcm_fmnist", tmp_path / "teacher", tmp_path / "run",
                                 [*lcm, f"student.init={tmp_path / 'lcm'}"])
    expected = folder_weights(tmp_path / "lcm")
    student = model.student.model.state_dict()
    assert all(torch.equal(student[k], expected[k]) for k in expected)
    trainer.end()
    with pytest.raises(ValueError, match="time_cond_proj_dim = None .*same guidance embedding"):
        built("lcm_fmnist", tmp_path / "teacher", tmp_path / "run2", [*lcm, f"student.init={tmp_path / 'plain'}"])


@pytest.fixture(scope="module")
def inputs(root, teacher):
    """Init folders that do not fit the tiny DDPM teacher's student."""
    f = root / "inputs"
    f.mkdir()
    (f / "empty_dir").mkdir()
    sd = tiny_sd_pipeline(f / "sd_parts")
    export_student(sd, f / "sd", model=sd.unet, timesteps=[999], method="dmd2")  # a UNet2DConditionModel student
    torch.manual_seed(2)
    DDPMPipeline(unet=tiny_unet(size=16), scheduler=DDPMScheduler()).save_pretrained(f / "wide")
    ddpm = DiffusionPipeline.from_pretrained(str(teacher))
    export_student(ddpm, f / "v", model=perturbed(ddpm.unet), timesteps=[999], method="dmd2",
                   scheduler_config={"prediction_type": "v_prediction"})
    return f


TRAIN = ["train", "{recipe}", "--teacher", "{teacher}", "--out", "{new}", "--set", "dmd2.ratio=2", "--set"]
CASES = [
    (TRAIN + ["student.init=/no/such/student"], "student.init = '/no/such/student' does not exist: give an exported"),
    (TRAIN + ["student.init={f}/empty_dir"], "is neither a pipeline folder (model_index.json) nor a run folder"),
    (TRAIN + ["student.init={f}/sd"], "its network is a UNet2DConditionModel, but this run's student is a UNet2DModel"),
    (TRAIN + ["student.init={f}/wide"], "has another config than this run's student UNet2DModel: sample_size = 16 ("
                                        "the student's: 8)"),
    (TRAIN + ["student.init={f}/v"], "its network outputs 'v_prediction' (its scheduler's prediction_type), but "
                                     "this run's student outputs 'epsilon'"),
    (TRAIN + ["student.init={first}", "--set", "student.lora_rank=2"],
     "cannot be split into the teacher's base and an adapter: set lora_rank = 0"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[c[0][-1] for c in CASES])
def test_bad_init_is_one_line_exit_2_and_changes_nothing(argv, message, recipe, teacher, first, inputs, tmp_path,
                                                         capsys):
    paths = {"recipe": recipe, "teacher": teacher, "new": tmp_path / "new", "f": inputs, "first": first}
    argv = [a.format(**paths) for a in argv]
    before = snapshot(tmp_path / "new", inputs, first, teacher)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fastgen train: error: "), err
    assert message.format(**paths) in lines[0]
    assert snapshot(tmp_path / "new", inputs, first, teacher) == before


def test_resume_refuses_an_init_folder_whose_weights_changed(first, teacher, recipe, root, one_thread, capsys):
    init = root / "init_copy"
    shutil.copytree(first / "student", init)
    run = root / "changed"
    common = ["--teacher", str(teacher), "--out", str(run), "--set", "dmd2.ratio=2", "--set", f"student.init={init}"]
    assert main(["train", str(recipe), *common, "--set", "train.steps=2"]) == 0
    ddpm = DiffusionPipeline.from_pretrained(str(init))
    export_student(ddpm, init, model=perturbed(ddpm.unet), timesteps=[999], method="dmd2")  # other weights, same path
    capsys.readouterr()
    before = snapshot(run)
    assert main(["train", str(recipe), *common, "--resume"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "no longer holds the weights the run started from" in lines[0], lines
    assert snapshot(run) == before
