"""sCM (continuous-time consistency distillation through TrigFlow) on a tiny SD3 teacher built from diffusers' classes:
the TrigFlow algebra, the JVP against a finite difference, a falling loss on a fixed batch, exact resume, and the
exported folder's README call in a fresh diffusers-only process against fastgen's sampler."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_resumes_exactly, fixed_batch_losses, tiny_sd3_pipeline
from safetensors.torch import load_file
from test_flow_teachers import PLAIN, fastgen_latents

from fastgen.cli import main
from fastgen.methods.scm import ContinuousConsistency, ScmOptions, trig_to_flow, trig_velocity
from fastgen.pipelines.export import read_metadata
from fastgen.pipelines.generate import denoiser_from_pipeline
from fastgen.train.runner import run_training


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """``(folder, pipe)``: a tiny SD3 teacher without T5 (CFG, shift 3), a prompt file and four 16x16 images."""
    from PIL import Image

    root = tmp_path_factory.mktemp("scm")
    torch.manual_seed(0)
    pipe = tiny_sd3_pipeline(root / "sd3")
    pipe = type(pipe)(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    pipe.save_pretrained(root / "sd3")
    (root / "prompts.txt").write_text("a photo of a sneaker\na photo of a bag\n")
    (root / "images").mkdir()
    for i in range(4):
        Image.fromarray((torch.rand(16, 16, 3) * 255).byte().numpy()).save(root / "images" / f"{i}.png")
    return root, pipe


def recipe(root, steps=2, checkpoint_every=0, timesteps="[1000.0, 662.7]"):
    path = root / f"scm-{steps}.toml"
    path.write_text(f"""method = "scm"
[student]
timesteps = {timesteps}
num_steps = {len(timesteps.split(","))}
[scm]
guidance_scale = 2.0
tangent_warmup = 2
[optim.generator]
lr = 1e-3
warmup_steps = 0
[train]
steps = {steps}
batch_size = 2
checkpoint_every = {checkpoint_every}
log_every = 1
progress = false
[data]
prompts = "{root / 'prompts.txt'}"
real = "{root / 'images'}"
num_workers = 0
""")
    return path


def method_on(pipe, **options):
    return ContinuousConsistency(denoiser_from_pipeline(pipe), [1000.0], ScmOptions(**options))


def test_trigflow_of_a_flow_network():
    """x_t = sigma_d (cos t x0 + sin t eps) is the flow point at s = sin t / (sin t + cos t), scaled; the exact
    velocity eps - x0 gives F = cos t eps - sin t x0, and f = cos t x_t - sin t sigma_d F is x0."""
    torch.manual_seed(0)
    x0, eps, sd = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), 0.5
    t = torch.tensor([0.1, 0.8, 1.5])
    c, s_ = torch.cos(t).reshape(-1, 1, 1, 1), torch.sin(t).reshape(-1, 1, 1, 1)
    x_t = sd * (c * x0 + s_ * eps)
    x_s, s = trig_to_flow(x_t / sd, t)
    sv = s.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_s, (1 - sv) * x0 + sv * eps)
    F = trig_velocity(x_s, s, eps - x0)
    torch.testing.assert_close(F, c * eps - s_ * x0)
    torch.testing.assert_close(c * x_t - s_ * sd * F, sd * x0)


def test_the_jvp_equals_a_finite_difference(teacher):
    method = method_on(teacher[1], tangent_warmup=0)
    method.student.model.double()
    torch.manual_seed(1)
    cond = denoiser_cond(teacher[1], 2)
    cond = type(cond)(*(None if v is None else v.double() for v in (cond.encoder_hidden_states,
                                                                    cond.pooled_projections, cond.timestep_cond)))
    x, t = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([0.3, 1.2], dtype=torch.float64)
    dx, dt = torch.randn_like(x), torch.tensor([0.7, -0.4], dtype=torch.float64)

    def F(x_, t_):
        return method.trig_network(method.student, x_, t_, cond)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        _, tangent = torch.func.jvp(F, (x, t), (dx, dt))
        # central differences: error O(h^2) (F varies fast in t: the timestep is 1000 s), floored by the time
        # embedding, which diffusers computes in float32 whatever the network's dtype
        h = 1e-4
        finite = (F(x + h * dx, t + h * dt) - F(x - h * dx, t - h * dt)) / (2 * h)
    scale = tangent.abs().max()
    assert scale > 0.1
    assert (tangent - finite).abs().max() < 1e-3 * scale


def denoiser_cond(pipe, n):
    from fastgen.pipelines.generate import encode_prompts

    with torch.no_grad():
        return encode_prompts(pipe, ["a photo of a bag"] * n, guidance=False)[0]


def test_loss_on_a_fixed_batch_decreases(teacher):
    """In the tangent warm-up's start (r = 0) the tangent is the velocity mismatch -cos^2 t (sigma_d F - dx_t/dt):
    the student, a copy of the teacher's unguided network, learns the guided teacher's velocity."""
    method = method_on(teacher[1], tangent_warmup=10**6, guidance_scale=4.0)
    before, after = fixed_batch_losses(method, teacher[1], lr=1e-3, steps=15, same_draws=True)
    assert after < 0.3 * before, (before, after)


class DeltaData(ContinuousConsistency):
    """sCM whose teacher and student are the exact flow of data at one point ``x0``: ``v = eps - x0`` with
    ``eps = (x_s - (1 - s) x0) / s``; its consistency function is ``sigma_d x0`` on every trajectory."""

    x0 = None
    scale = 1.0  # a student velocity off by this factor is not consistent

    def trig_network(self, network, x, t, cond, uncond=None, guidance_scale=None):
        x_s, s = trig_to_flow(x, t)
        sv = s.reshape(-1, 1, 1, 1)
        v = (x_s - (1 - sv) * self.x0) / sv - self.x0
        return trig_velocity(x_s, s, v * (self.scale if network is self.student else 1.0))


@pytest.mark.parametrize("scale", [1.0, 1.1])
def test_the_tangent_vanishes_exactly_for_a_consistent_student(teacher, scale):
    """g = -cos^2 t (sigma_d F- - dx/dt) - cos t sin t (x_t + sigma_d dF-/dt), with the JVP: zero for the exact
    flow of one data point (its f is constant along each trajectory), not zero for a student 10% off."""
    method = DeltaData(denoiser_from_pipeline(teacher[1]), [1000.0], ScmOptions(tangent_warmup=0, tangent_c=1.0))
    torch.manual_seed(2)
    method.x0, method.scale = torch.randn(1, 4, 8, 8), scale
    t = torch.tensor([0.2, 0.7, 1.3])
    x_t = 0.5 * (torch.cos(t).reshape(-1, 1, 1, 1) * method.x0 + torch.sin(t).reshape(-1, 1, 1, 1)
                 * torch.randn(3, 4, 8, 8))
    _, g = method.tangent(x_t, t, None, None, step=1)
    rms = g.flatten(1).norm(dim=1) / 16  # g / (rms(g) + 1): about g itself where g is small
    assert (rms.max() < 1e-4) if scale == 1.0 else (rms.min() > 1e-2), rms


def test_the_adaptive_weighting_learns_the_loss_scale(teacher):
    method = method_on(teacher[1], tangent_warmup=0)
    assert set(method.parameter_groups()) == {"generator", "weighting"}
    opt = torch.optim.Adam(method.weighting.parameters(), lr=5e-2)
    t = torch.full((4,), 500.0)
    for _ in range(300):  # logvar(t) -> log of a fixed error 0.25: the minimiser of error / e^logvar + logvar
        loss = (0.25 / method.weighting(t).exp() + method.weighting(t)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert method.weighting(t).mean().item() == pytest.approx(torch.log(torch.tensor(0.25)).item(), abs=0.05)


def test_resume_is_exact(teacher, tmp_path):
    folder, _ = teacher
    whole = assert_resumes_exactly(ContinuousConsistency, recipe(folder, steps=4, checkpoint_every=2),
                                   folder / "sd3", tmp_path, stops=(3,))
    final = load_file(str(whole / "checkpoints" / "checkpoint-0000004" / "model.safetensors"))
    assert any(k.startswith("weighting.") for k in final)
    assert float(final["weighting.linear.bias"]) != 0.0  # the weighting network trained and was checkpointed


def test_export_plain_call_matches_the_sampler_at_1_and_2_steps(teacher, tmp_path):
    folder, _ = teacher
    students = {n: run_training(str(recipe(folder, timesteps=ts)), teacher=str(folder / "sd3"),
                                out=str(tmp_path / f"run{n}")) for n, ts in ((1, "[1000.0]"), (2, "[1000.0, 662.7]"))}
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(PLAIN), *map(str, students.values())],
                            capture_output=True, text=True, env=env, cwd="/")
    assert result.returncode == 0, result.stderr[-3000:]
    for n, student in students.items():
        meta = read_metadata(student)
        assert meta["method"] == "scm" and meta["call"].startswith("sigmas=[1.0" + ("]" if n == 1 else ", 0.6627"))
        ours, _ = fastgen_latents(student)
        plain = load_file(str(student / "plain.safetensors"))["latents"]
        torch.testing.assert_close(plain, ours, atol=1e-5, rtol=0)
    log = json.loads((tmp_path / "run2" / "train_log.json").read_text())
    assert log["steps_run"] == 2


def test_vp_teachers_are_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "r.toml").write_text('method = "scm"\nteacher = "digits-ddpm"\n[data]\nreal = "zoo"\n'
                                     '[train]\nsteps = 1\nbatch_size = 2\nprogress = false\n')
    assert main(["train", str(tmp_path / "r.toml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "scm distils flow-matching teachers" in err and "use cd or lcm" in err
    assert not (tmp_path / "run" / "student").exists()
