"""`fastgen eval` / `bench` on your own model: a tiny Stable Diffusion pipeline outside the zoo, scored with your
prompts, with the metrics that do not need the zoo's classifiers; every missing input is reported before any image."""

import json

import numpy as np
import open_clip
import pytest
import torch
from conftest import tiny_sd_pipeline
from diffusers import DiffusionPipeline

from fastgen.cli import main
from fastgen.eval.evaluate import evaluate
from fastgen.eval.metrics import clip_score, load_clip
from fastgen.pipelines.export import export_student

PROMPTS = ["a red dress", "a blue bag", "a green coat"]
TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A tiny SD teacher folder, a student of it, a prompt file and tiny CLIP weights (a checkpoint file)."""
    root = tmp_path_factory.mktemp("own")
    teacher = root / "teacher"
    pipe = tiny_sd_pipeline(teacher)
    pipe.save_pretrained(teacher)
    student = export_student(pipe, root / "student", timesteps=[999, 499], method="dmd2")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    config = root / "fastgen-own-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    weights = root / "tiny-clip.pt"
    torch.save(open_clip.create_model("fastgen-own-clip").state_dict(), weights)
    return {"teacher": teacher, "student": student, "prompts": prompts, "clip": str(weights), "root": root}


def test_eval_skips_the_domain_metrics_once_and_scores_clip_with_your_prompts(own, capsys):
    result = evaluate(str(own["student"]), num_images=10, prompts=str(own["prompts"]), progress=False,
                      metrics=["fd", "recall", "acc", "clip", "speed"], clip_model="fastgen-own-clip",
                      clip_pretrained=own["clip"])
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 1 and "fd, recall, acc skipped" in printed
    m = result["metrics"]
    assert "fd" not in m and "acc" not in m and m["nfe"] == 2 and m["images_per_s"] > 0
    # the score is that of the student's plain call on the file's prompts (cycled), each image against its prompt
    pipe = DiffusionPipeline.from_pretrained(own["student"])
    pipe.set_progress_bar_config(disable=True)
    prompts = [PROMPTS[i % 3] for i in range(10)]
    images = pipe(prompts, num_inference_steps=2, guidance_scale=0.0, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    model, preprocess, tokenizer = load_clip("fastgen-own-clip", own["clip"], device="cpu")
    want = clip_score(images, prompts, model=model, preprocess=preprocess, tokenizer=tokenizer)
    assert m["clip"] == pytest.approx(want, abs=1e-4)
    other = clip_score(images, ["a photo of a sneaker"] * 10, model=model, preprocess=preprocess, tokenizer=tokenizer)
    assert other != pytest.approx(want, abs=1e-4)  # the prompts matter: the zoo's would score otherwise


def test_bench_runs_on_your_own_teacher_with_the_metrics_available(own, capsys):
    out = own["root"] / "bench"
    assert main(["bench", str(own["teacher"]), "--students", str(own["student"]), "--solvers", "ddim,euler", "--nfes",
                 "1,2", "--num-images", "10", "--prompts", str(own["prompts"]), "--metrics", "fd,clip,speed",
                 "--clip-model", "fastgen-own-clip", "--clip-pretrained", own["clip"], "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("fd skipped") == 1
    result = json.loads((out / "bench.json").read_text())
    assert len(result["rows"]) == 5 and result["floor"] == {} and result["zoo"] is None
    assert all(0 <= r["clip"] <= 100 and "fd" not in r for r in result["rows"])
    table = (out / "bench.md").read_text()
    assert "| CLIP score |" in table and "real data" not in table and (out / "bench.png").stat().st_size > 1000


@pytest.mark.parametrize("extra, message", [
    ([], "is text-to-image and neither a zoo teacher nor a student of one: give --prompts FILE"),
    (["--prompts", "{prompts}", "--metrics", "fd,acc"], "fd, acc use the zoo's data and domain classifiers"),
    (["--prompts", "{prompts}", "--metrics", "fid", "--fid-reference", "mystats:custom"],
     "clean-fid custom statistics mystats_clean_custom_na.npz for 'mystats' are missing: make them with "
     "cleanfid.fid.make_custom_stats('mystats', IMAGE_FOLDER)"),
    (["--prompts", "{prompts}", "--metrics", "clip", "--clip-pretrained", "{root}/no-such-clip.pt"],
     "open_clip has no pretrained tag"),
])
def test_own_model_inputs_are_checked_before_any_image(own, capsys, extra, message):
    out = own["root"] / "never"
    argv = ["eval", str(own["student"]), "--num-images", "10", "--out", str(out)]
    argv += [a.format(prompts=own["prompts"], root=own["root"]) for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()  # nothing was generated or written


@pytest.mark.skipif(not __import__("pathlib").Path("/tmp/inception-2015-12-05.pt").exists(),
                    reason="clean-fid's Inception weights are not on this machine")
def test_fid_against_a_reference_folder(own):
    from fastgen.pipelines.images import save_image_folder

    reference = save_image_folder(torch.rand(10, 3, 16, 16), own["root"] / "reference")
    result = evaluate(str(own["student"]), num_images=10, prompts=str(own["prompts"]), progress=False,
                      metrics=["fid"], fid_reference=str(reference))
    assert np.isfinite(result["metrics"]["fid"])
