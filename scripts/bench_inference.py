"""What a 1-step student's call costs beyond its unavoidable parts, side by side in one run.

    OMP_NUM_THREADS=2 python scripts/bench_inference.py --student runs/f1/student --out bench/inference

The unavoidable parts of a text-to-image call: text encoding (tokenizer + text encoder), the network calls
(one UNet call for a 1-step student without guidance) and the VAE decode, each timed alone. Against their sum
it times, interleaved round by round so that load changes hit all alike (medians of ``--repeats`` rounds):

* the plain folder, ``DiffusionPipeline.from_pretrained(folder)``, called as its model card says with
  ``output_type="pt"`` and the progress bar disabled (what a caller can remove), and with diffusers' defaults
  (PIL output, progress bar on, written to /dev/null);
* ``FewStepPipeline.from_pretrained(folder)``, ``output_type="pt"`` and the default PIL.

Then it times each stage inside the plain call (wrappers around the pipeline's own methods) to show where the
rest goes. Writes ``inference.json`` and ``inference.md``; prints the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from fastgen import zoo
from fastgen.pipelines import FewStepPipeline
from fastgen.pipelines.export import read_metadata

# Methods of the plain StableDiffusionPipeline (and its scheduler, networks, image processor) timed per stage.
STAGES = {
    "pipe": ("check_inputs", "encode_prompt", "prepare_latents", "prepare_extra_step_kwargs", "run_safety_checker",
             "maybe_free_model_hooks", "progress_bar"),
    "scheduler": ("set_timesteps", "step"),
    "image_processor": ("postprocess",),
}


def timed(fn, records: dict, name: str):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            records[name] = records.get(name, 0.0) + time.perf_counter() - start
    return wrapper


def instrument(pipe, records: dict) -> None:
    """Wrap the plain pipeline's stage methods (on the instances) so each call adds its time to ``records``."""
    for owner_name, methods in STAGES.items():
        owner = pipe if owner_name == "pipe" else getattr(pipe, owner_name)
        for method in methods:
            setattr(owner, method, timed(getattr(owner, method), records, method))
    pipe.unet.forward = timed(pipe.unet.forward, records, "unet")
    pipe.vae.decode = timed(pipe.vae.decode, records, "vae.decode")
    pipe.text_encoder.forward = timed(pipe.text_encoder.forward, records, "text_encoder")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="an exported 1-step text-to-image student folder")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--repeats", type=int, default=60, help="timed rounds per batch size (after 5 warm-up)")
    parser.add_argument("--out", default="bench/inference")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    meta = read_metadata(args.student)
    if meta.get("num_steps") != 1:
        raise SystemExit(f"--student {args.student}: a 1-step student is needed (its metadata says {meta}).")
    plain = DiffusionPipeline.from_pretrained(args.student)
    plain.set_progress_bar_config(disable=True)
    defaults = DiffusionPipeline.from_pretrained(args.student)
    defaults.set_progress_bar_config(file=open(os.devnull, "w"))
    few = FewStepPipeline.from_pretrained(args.student)
    t, w = meta["timesteps"][0], meta["guidance_scale"]
    results = {"student": args.student, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "machine": f"{platform.machine()} {platform.processor()}".strip(), "torch": torch.__version__,
               "load_before": load_before, "rows": {}}
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = [zoo.prompts()[i % 10] for i in range(batch)]
        tok, enc, unet, vae = plain.tokenizer, plain.text_encoder, plain.unet, plain.vae
        with torch.no_grad():
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            embeds = enc(ids)[0]
            latents = torch.randn(batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)

        def text():
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            return enc(ids)[0]

        call = {"num_inference_steps": 1, "guidance_scale": w}
        jobs = {
            "text encoding": text,
            "UNet call": lambda: unet(latents, t, encoder_hidden_states=embeds).sample,
            "VAE decode": lambda: vae.decode(latents / vae.config.scaling_factor).sample,
            "plain, pt, no bar": lambda: plain(prompts, output_type="pt", **call),
            "plain, diffusers defaults (PIL, bar)": lambda: defaults(prompts, **call),
            "FewStepPipeline, pt": lambda: few(prompts, output_type="pt"),
            "FewStepPipeline, PIL": lambda: few(prompts),
        }
        times = {name: [] for name in jobs}
        with torch.no_grad():
            for round_ in range(args.repeats + 5):
                for name, fn in jobs.items():
                    start = time.perf_counter()
                    fn()
                    if round_ >= 5:
                        times[name].append(time.perf_counter() - start)
        ms = {name: 1000 * statistics.median(v) for name, v in times.items()}
        parts = ms["text encoding"] + ms["UNet call"] + ms["VAE decode"]
        rows = {name: {"ms": value, "x_parts": value / parts, "beyond_parts_ms": value - parts}
                for name, value in ms.items()}
        records: dict = {}
        instrument(plain, records)
        with torch.no_grad():
            for _ in range(args.repeats):
                timed(plain, records, "whole call")(prompts, output_type="pt", **call)
        stages = {name: 1000 * total / args.repeats for name, total in records.items()}
        nested = ("whole call", "text_encoder")  # text_encoder runs inside encode_prompt
        stages["rest of __call__"] = stages["whole call"] - sum(v for k, v in stages.items() if k not in nested)
        start = time.perf_counter()
        for _ in range(args.repeats):
            plain._execution_device  # noqa: B018 -- read once per call by __call__
        stages["of which pipe._execution_device"] = 1000 * (time.perf_counter() - start) / args.repeats
        results["rows"][str(batch)] = {"parts_ms": parts, "calls": rows, "plain_stages_ms": stages}
        plain = DiffusionPipeline.from_pretrained(args.student)  # without the wrappers, for the next batch size
        plain.set_progress_bar_config(disable=True)
        print(json.dumps({"batch": batch, **results["rows"][str(batch)]}, indent=1), flush=True)
    results["load_after"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "inference.json").write_text(json.dumps(results, indent=1))
    (out / "inference.md").write_text(markdown(results))
    print(markdown(results))
    return results


def markdown(results: dict) -> str:
    batches = list(results["rows"])
    lines = ["| call | " + " | ".join(f"batch {b}: ms | x parts" for b in batches) + " |",
             "|---|" + "---:|---:|" * len(batches)]
    names = list(results["rows"][batches[0]]["calls"])
    for name in names:
        cells = []
        for b in batches:
            row = results["rows"][b]["calls"][name]
            part = name in ("text encoding", "UNet call", "VAE decode")
            cells += [f"{row['ms']:.2f}", "(part)" if part else f"{row['x_parts']:.3f}x"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| sum of the three parts | " + " | ".join(
        f"{results['rows'][b]['parts_ms']:.2f} | 1.000x" for b in batches) + " |")
    lines += ["", "Inside the plain call (ms per call, mean; `text_encoder` is part of `encode_prompt`):", "",
              "| stage | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---:|" * len(batches)]
    stage_names = list(results["rows"][batches[0]]["plain_stages_ms"])
    for stage in stage_names:
        lines.append(f"| {stage} | " + " | ".join(f"{results['rows'][b]['plain_stages_ms'].get(stage, 0):.2f}"
                                                 for b in batches) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
