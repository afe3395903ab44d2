"""fastgen's decoding (PipelineSampler.decode: sampling, evaluation grids, FewStepPipeline) of an fp16 SDXL pipeline
follows StableDiffusionXLPipeline's rule: a VAE with ``force_upcast`` (SDXL's overflows in fp16) decodes in fp32."""

import torch
from conftest import tiny_sdxl_pipeline

from fastgen.pipelines.generate import PipelineSampler

PROMPTS = ["a photo of a sneaker", "a photo of a bag"]


def test_an_fp16_sdxl_vae_decodes_in_fp32_as_the_sdxl_pipeline_does(tmp_path):
    pipe = tiny_sdxl_pipeline(tmp_path).to(torch.float16)
    pipe.set_progress_bar_config(disable=True)
    vae = pipe.vae
    assert vae.config.force_upcast and vae.dtype == torch.float16
    sampler = PipelineSampler(pipe)
    for scale in (1.0, 5000.0):  # 5000: this tiny VAE overflows in fp16, as SDXL's does at its own scale
        latents = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * scale).half()
        ours = sampler.decode(latents)
        assert vae.dtype == torch.float16 and ours.dtype == torch.float32 and torch.isfinite(ours).all()

        def decode_these(_pipe, _i, _t, _tensors):  # diffusers' SDXL call then decodes exactly these latents
            return {"latents": latents}

        want = pipe(PROMPTS, num_inference_steps=1, output_type="pt", callback_on_step_end=decode_these,
                    callback_on_step_end_tensor_inputs=["latents"]).images
        torch.testing.assert_close(ours, want, atol=1e-6, rtol=0)
        with torch.no_grad():
            in_fp16 = vae.decode(latents / vae.config.scaling_factor).sample
        if scale > 1:
            assert not torch.isfinite(in_fp16).all()  # what decoding without the upcast gives
        else:
            assert (in_fp16.float() / 2 + 0.5 - ours).abs().max() > 1e-4
