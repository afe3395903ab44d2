"""The trainer, recipes and runner: update schedule, resume, atomic checkpoints, bad input, export round trip."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe, tiny_unet
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline
from safetensors.torch import load_file

from fastgen.methods import DMD2
from fastgen.pipelines.export import read_metadata
from fastgen.pipelines.generate import PipelineSampler
from fastgen.train import recipes
from fastgen.train.data import BatchStream, PromptBank
from fastgen.train.runner import export_checkpoint, run_training
from fastgen.train.trainer import NonFiniteLossError, latest_checkpoint

PROMPTS = ["a photo of a bag", "a photo of a coat"]


@pytest.fixture(scope="module")
def ddpm_teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddpm") / "teacher"
    torch.manual_seed(0)
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


def zoo_prompts(folder):
    """The zoo's class prompts as a prompt file: the tiny SD teacher is not a zoo teacher, so data.prompts = "zoo" is
    refused for it."""
    from fastgen import zoo

    path = folder / "zoo_prompts.txt"
    path.write_text("\n".join(zoo.prompts()) + "\n")
    return path


@pytest.fixture(scope="module")
def sd_teacher(tmp_path_factory):
    """A tiny text-to-image StableDiffusionPipeline (byte tokenizer, 1-channel 16x16 images, 4x8x8 latents)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from fastgen.train.teachers import build_byte_tokenizer, build_text_encoder

    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    tokenizer = build_byte_tokenizer(root / "tok")
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, sample_size=16, layers_per_block=1,
                        block_out_channels=(8, 16), norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), cross_attention_dim=64, attention_head_dim=4,
                                norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=build_text_encoder(tokenizer), tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                           beta_end=0.012, clip_sample=False, steps_offset=1),
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root / "teacher")
    return root / "teacher"


@pytest.fixture
def recipe(tmp_path):
    return tiny_recipe(tmp_path / "tiny.toml")


def weights(folder: Path) -> dict:
    return load_file(str(next((folder / "unet").glob("*.safetensors"))))


def test_update_counts_follow_the_ratio(ddpm_teacher, recipe, tmp_path):
    for accum in (1, 2):
        out = tmp_path / f"run{accum}"
        run_training(recipe, ["train.steps=7", "dmd2.ratio=3", f"train.grad_accum={accum}", "train.checkpoint_every=0"],
                     teacher=str(ddpm_teacher), out=str(out))
        log = json.loads((out / "train_log.json").read_text())
        assert log["update_counts"] == {"generator": 3, "critic": 7}  # generator at steps 0, 3, 6
        assert log["steps_run"] == 7 and log["history"][-1]["step"] == 6


def test_resume_equals_uninterrupted_run(ddpm_teacher, recipe, tmp_path):
    common = ["student.ema_decay=0.5"]  # the EMA is checkpointed too
    whole = run_training(recipe, common, teacher=str(ddpm_teacher), out=str(tmp_path / "a"))
    run_training(recipe, common + ["train.steps=3"], teacher=str(ddpm_teacher), out=str(tmp_path / "b"))
    checkpoints = tmp_path / "b" / "checkpoints"
    # a kill during a later save leaves a temporary folder (and a folder without its state file): both ignored
    (checkpoints / ".tmp-checkpoint-0000005").mkdir()
    (checkpoints / ".tmp-checkpoint-0000005" / "model.safetensors").write_bytes(b"garbage")
    (checkpoints / "checkpoint-0000004").mkdir()
    assert latest_checkpoint(checkpoints).name == "checkpoint-0000003"
    with pytest.raises(ValueError, match="--resume"):
        run_training(recipe, common, teacher=str(ddpm_teacher), out=str(tmp_path / "b"))
    resumed = run_training(recipe, common, teacher=str(ddpm_teacher), out=str(tmp_path / "b"), resume=True)
    assert not (checkpoints / ".tmp-checkpoint-0000005").exists()
    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)
    final_a = load_file(str(tmp_path / "a" / "checkpoints" / "checkpoint-0000006" / "model.safetensors"))
    final_b = load_file(str(checkpoints / "checkpoint-0000006" / "model.safetensors"))
    assert any("critic" in k for k in final_a) and not any(k.startswith("teacher.") for k in final_a)
    for key in final_a:  # critic and student (the teacher is not stored)
        torch.testing.assert_close(final_b[key], final_a[key], rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "b" / "train_log.json").read_text())["update_counts"] == {"generator": 3, "critic": 6}


def test_nan_loss_stops_naming_step_and_keeps_last_checkpoint(ddpm_teacher, recipe, tmp_path, monkeypatch):
    original = DMD2.training_step

    def poisoned(self, batch, step):
        out = original(self, batch, step)
        if step == 4:
            out.losses["critic"] = out.losses["critic"] * float("nan")
            out.logs["dsm"] = out.logs["dsm"] * float("nan")
        return out

    monkeypatch.setattr(DMD2, "training_step", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 5: dsm = nan.*checkpoint-0000004"):
        run_training(recipe, ["train.checkpoint_every=2"], teacher=str(ddpm_teacher), out=str(tmp_path / "nan"))
    checkpoints = tmp_path / "nan" / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "checkpoint-0000004"
    assert not list(checkpoints.glob(".tmp-*")) and not (tmp_path / "nan" / "student").exists()


def test_recipe_errors(ddpm_teacher, recipe, tmp_path):
    with pytest.raises(ValueError, match=r"'train.stpes'.*steps, batch_size"):
        recipes.load_recipe(recipe, ["train.stpes=3"])
    with pytest.raises(ValueError, match=r"'colour'.*method, teacher"):
        recipes.load_recipe(recipe, ["colour=3"])
    with pytest.raises(ValueError, match="expects int"):
        recipes.load_recipe(recipe, ["train.steps=many"])
    cfg = recipes.load_recipe(recipe, ["dmd2.guidance_scale=3", "student.timesteps=[999, 499]", "teacher=some/model",
                                       "optim.critic.lr=3e-4", "student.num_steps=2"])
    assert cfg.options.guidance_scale == 3.0 and cfg.student.timesteps == [999, 499] and cfg.teacher == "some/model"
    assert cfg.optim["critic"].lr == 3e-4 and cfg.optim["generator"].lr == 1e-3
    with pytest.raises(FileNotFoundError, match="dmd2_fmnist_1step"):
        recipes.load_recipe("no_such_recipe")
    assert "train.steps" in recipes.describe_options()
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        run_training(recipe, teacher=str(tmp_path), out=str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="neither a zoo teacher"):
        run_training(recipe, teacher="/no/such/teacher", out=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="out of range"):
        run_training(recipe, ["student.timesteps=[1000]"], teacher=str(ddpm_teacher), out=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="descending"):
        run_training(recipe, ["student.timesteps=[499, 999]"], teacher=str(ddpm_teacher), out=str(tmp_path / "x"))


def test_shipped_recipes_load():
    names = recipes.available_recipes()
    for name in ("dmd2_fmnist_1step", "dmd2_fmnist_4step", "dmd2_fmnist_1step_lora", "dmd2_fmnist_4step_lora",
                 "dmd2_digits_1step", "dmd_fmnist_1step", "dmd2_sd15_template", "dmd2_sdxl_template"):
        assert name in names
        cfg = recipes.load_recipe(name)
        assert cfg.method in ("dmd", "dmd2", "sid") and cfg.train.batch_size > 0


def test_lora_student_export_round_trip(sd_teacher, recipe, tmp_path):
    """A briefly trained 2-step LoRA student: the fused folder loads with plain diffusers and gives
    fastgen's sampler output; the LoRA file on the teacher gives the same images."""
    folder = run_training(recipe, ["student.num_steps=2", "student.lora_rank=4", "critic.lora_rank=4",
                                   f"data.prompts={zoo_prompts(tmp_path)}", "train.steps=2", "dmd2.ratio=1", "optim.generator.lr=1e-2", "train.checkpoint_every=2"],
                          teacher=str(sd_teacher), out=str(tmp_path / "lora"))
    again = export_checkpoint(tmp_path / "lora", out=tmp_path / "again")  # fastgen export: the same two folders
    a, b = weights(folder), weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a) and (tmp_path / "again_lora" / "pytorch_lora_weights.safetensors"
                                                         ).is_file()
    meta = read_metadata(folder)
    assert meta["timesteps"] == [999, 499] and meta["method"] == "dmd2" and meta["guidance_scale"] == 0.0
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and type(pipe.scheduler).__name__ == "LCMScheduler"
    kwargs = dict(prompt=PROMPTS, num_inference_steps=2, guidance_scale=0.0, output_type="pt")
    plain = pipe(**kwargs, generator=torch.Generator().manual_seed(3)).images
    ours = PipelineSampler(pipe)(PROMPTS, timesteps=meta["timesteps"], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(plain, ours, rtol=0, atol=1e-4)

    teacher = DiffusionPipeline.from_pretrained(sd_teacher)
    teacher_images = PipelineSampler(teacher)(PROMPTS, timesteps=[999, 499], generator=torch.Generator().manual_seed(3))
    assert (teacher_images - ours).abs().max() > 1e-4  # the student was trained
    teacher.scheduler = pipe.scheduler
    teacher.load_lora_weights(tmp_path / "lora" / "student_lora")
    with_lora = teacher(**kwargs, generator=torch.Generator().manual_seed(3)).images
    torch.testing.assert_close(with_lora, plain, rtol=0, atol=1e-4)


def test_periodic_evaluation_does_not_change_training(ddpm_teacher, recipe, tmp_path):
    calls = []

    def evaluate_folder(folder, num_images, device, grid=None):
        calls.append(read_metadata(folder)["method"])
        torch.randn(100)  # evaluation draws random numbers: training's RNG must not notice
        return {"fd": 1.0 / len(calls)}

    plain = run_training(recipe, ["train.checkpoint_every=0"], teacher=str(ddpm_teacher), out=str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="eval_every needs an evaluator"):
        run_training(recipe, ["train.eval_every=2"], teacher=str(ddpm_teacher), out=str(tmp_path / "none"))
    evaluated = run_training(recipe, ["train.checkpoint_every=0", "train.eval_every=2"], teacher=str(ddpm_teacher),
                             out=str(tmp_path / "eval"), evaluate_folder=evaluate_folder)
    assert calls == ["dmd2"] * 3  # an exported student folder at steps 2, 4, 6
    assert not list((tmp_path / "eval" / "eval").iterdir())  # the scratch folders are removed
    lines = (tmp_path / "eval" / "eval.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4, 6]
    a, b = weights(plain), weights(evaluated)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batch_stream_shards_are_slices_of_one_global_draw(sd_teacher):
    pipe = StableDiffusionPipeline.from_pretrained(sd_teacher)
    bank = PromptBank(pipe, [f"a photo of a {c}" for c in "abcdefgh"])
    whole, one = BatchStream(8, bank, seed=5, num_shards=1), BatchStream(8, bank, seed=5)
    shards = [BatchStream(4, bank, seed=5, num_shards=2, shard=i) for i in range(2)]
    for _ in range(3):
        a, b, parts = next(whole), next(one), [next(s) for s in shards]
        assert torch.equal(a.cond.encoder_hidden_states, b.cond.encoder_hidden_states)  # one shard == no sharding
        assert not torch.equal(parts[0].cond.encoder_hidden_states, parts[1].cond.encoder_hidden_states)
    assert all(torch.equal(s.generator.get_state(), shards[0].generator.get_state()) for s in shards)
    with pytest.raises(ValueError, match="shard"):
        BatchStream(4, bank, num_shards=2, shard=2)


def test_two_process_data_parallel_run_resumes_exactly(ddpm_teacher, recipe, tmp_path):
    """DDP on CPU (gloo) through torchrun, as `accelerate launch` runs it on GPUs: each process draws its own
    batch and noise (identical processes would reproduce the one-process run exactly), checkpoints hold
    every process's RNG state, and a run stopped and resumed ends with the uninterrupted run's weights."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}

    def launch(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fastgen.cli", "train", recipe, "--teacher", str(ddpm_teacher), "--out", str(tmp_path / out),
               "--set", "student.ema_decay=0.5", *extra]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    launch("whole")
    launch("part", "--set", "train.steps=3")
    launch("part", "--resume")
    single = run_training(recipe, ["student.ema_decay=0.5"], teacher=str(ddpm_teacher), out=str(tmp_path / "single"))
    final = {name: load_file(str(tmp_path / name / "checkpoints" / "checkpoint-0000006" / "model.safetensors"))
             for name in ("whole", "part", "single")}
    for key in final["whole"]:
        torch.testing.assert_close(final["part"][key], final["whole"][key], rtol=0, atol=1e-5)
    a, b = weights(tmp_path / "whole" / "student"), weights(tmp_path / "part" / "student")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)
    assert max(float((final["whole"][k] - final["single"][k]).abs().max()) for k in final["whole"]) > 1e-4
    checkpoint = tmp_path / "part" / "checkpoints" / "checkpoint-0000006"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    log = json.loads((tmp_path / "whole" / "train_log.json").read_text())
    assert log["update_counts"] == {"generator": 3, "critic": 6}
    assert log["ddp_find_unused_parameters"]  # the generator rests on critic-only iterations (ratio 2)
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "whole" / "student")).__name__ == "ConsistencyModelPipeline"
    # ratio 1: every iteration reaches every parameter, so DDP runs without the search (it would fail otherwise)
    launch("every", "--set", "dmd2.ratio=1", "--set", "train.steps=3")
    log = json.loads((tmp_path / "every" / "train_log.json").read_text())
    assert not log["ddp_find_unused_parameters"] and log["update_counts"] == {"generator": 3, "critic": 3}


def test_mixed_precision_defaults_to_the_accelerate_config(ddpm_teacher, recipe, tmp_path):
    """train.mixed_precision unset: accelerate's config decides (`accelerate launch --mixed_precision bf16` sets
    ACCELERATE_MIXED_PRECISION); bf16 autocast runs on the CPU. A recipe value still wins over the config."""
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def train(out, *extra):
        cmd = [sys.executable, "-m", "fastgen.cli", "train", recipe, "--teacher", str(ddpm_teacher), "--out",
               str(tmp_path / out), "--set", "train.steps=2", "--set", "train.checkpoint_every=0", *extra]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((tmp_path / out / "train_log.json").read_text())

    assert recipes.load_recipe(recipe).train.mixed_precision == ""
    assert train("config")["mixed_precision"] == "bf16"
    assert train("recipe", "--set", "train.mixed_precision=no")["mixed_precision"] == "no"


def test_evaluations_write_sample_grids_and_a_resume_continues_the_tensorboard_run(recipe, tmp_path):
    """Each evaluation writes samples/step-N.png and logs it with the metrics; a resumed run logs into the same
    TensorBoard run (logs/fastgen), and what a killed run logged after its checkpoint is purged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fastgen.eval.evaluate import training_evaluator

    out = tmp_path / "run"
    common = ["train.eval_every=2", "train.eval_images=10", "train.trackers=['tensorboard']", "train.log_every=1",
              "train.checkpoint_every=2"]
    run_training(recipe, common + ["train.steps=4"], teacher="digits-ddpm", out=str(out),
                 evaluate_folder=training_evaluator)
    shutil.rmtree(out / "checkpoints" / "checkpoint-0000004")  # as if killed after logging steps 3 and 4
    run_training(recipe, common + ["train.steps=6"], teacher="digits-ddpm", out=str(out), resume=True,
                 evaluate_folder=training_evaluator)
    grids = ["samples/step-0000002.png", "samples/step-0000004.png", "samples/step-0000006.png"]
    assert all((out / g).is_file() for g in grids)
    records = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["samples"]) for r in records] == list(zip([2, 4, 6], grids))  # the killed part's 4: gone
    assert [p.name for p in (out / "logs").iterdir()] == ["fastgen"]  # one run, continued
    events = EventAccumulator(str(out / "logs" / "fastgen"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert sorted({e.step for e in events.Images("eval/samples")}) == [2, 4, 6]
    steps = [e.step for e in events.Scalars("train/s_per_step")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 of the killed part are purged, then logged again


def test_gan_run_on_an_image_folder_streams_it_and_resumes_exactly(sd_teacher, recipe, tmp_path):
    """data.real = a folder of odd-sized images: DMD2's GAN head trains on it through the streamed, VAE-encoded
    batches at the teacher's latent shape, and a run stopped and resumed ends as the uninterrupted one."""
    from test_real_images import odd_folder

    from fastgen.train.real_images import RealImageStream

    folder = odd_folder(tmp_path / "images")
    pipe = StableDiffusionPipeline.from_pretrained(sd_teacher)
    assert RealImageStream(pipe, folder, batch_size=4, num_workers=0).next_batch().shape == (4, 4, 8, 8)
    gan = ["critic.gan_head=true", "dmd2.gan_generator_weight=0.01", "dmd2.gan_critic_weight=0.01",
           f"data.real={folder}", "data.num_workers=1", f"data.prompts={zoo_prompts(tmp_path)}",
           "train.batch_size=2"]
    whole = run_training(recipe, gan, teacher=str(sd_teacher), out=str(tmp_path / "whole"))
    run_training(recipe, gan + ["train.steps=3"], teacher=str(sd_teacher), out=str(tmp_path / "part"))
    checkpoint = load_file(str(tmp_path / "part" / "checkpoints" / "checkpoint-0000003" / "trainer_state.safetensors"))
    assert checkpoint["data.real_position"].tolist() == [3]  # the stream's position is checkpointed
    resumed = run_training(recipe, gan + ["data.num_workers=0"], teacher=str(sd_teacher), out=str(tmp_path / "part"),
                           resume=True)
    a, b = weights(whole), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    final = load_file(str(tmp_path / "whole" / "checkpoints" / "checkpoint-0000006" / "model.safetensors"))
    assert any("head" in k for k in final)  # the GAN head trained and is checkpointed
    assert not (tmp_path / "whole" / "cache" / "real.safetensors").exists()  # streamed, not encoded whole
