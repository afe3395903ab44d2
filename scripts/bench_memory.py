"""Peak memory and seconds per step of full-weight vs LoRA DMD2 and SiD at the scale users train: an
SD1.5-architecture ``UNet2DConditionModel`` with random weights (diffusers' SD1.5 UNet config, 64x64 latents,
77-token text embeddings of random values), fp32 and bf16, with and without gradient checkpointing.

    OMP_NUM_THREADS=1 python scripts/bench_memory.py --width-scale 0.5 --lora-width-scales 0.5,1.0 --out bench/memory

Every row runs in a process of its own (so its peak is its own) through fastgen's real path: the recipe
``dmd2_1step`` / ``sid_1step`` with ``--set`` overrides, the method class, :func:`fastgen.train.runner.build_trainer`
(trained dtype, gradient checkpointing, one AdamW per group, mixed precision) and :meth:`Trainer.train` at batch 1,
``--warmup`` steps then ``--steps`` timed ones. Only the pipeline around the network is left out: the teacher is the
random UNet with the SD1.5 scheduler's noise schedule, the prompts are random embeddings (a text encoder runs once
per prompt, outside the training step). Peak memory: the process's peak resident set (``getrusage``) on CPU,
``torch.cuda.max_memory_allocated`` on CUDA. A row whose process grows past ``--max-rss-gb`` is stopped and
reported as not fitting. Writes ``memory.json`` and ``memory.md`` (the table of docs/benchmarks.md).

Precisions (``--precisions``): ``fp32`` -- everything fp32, no autocast; ``bf16`` -- teacher loaded in bf16
(``loading.dtype``), fp32 trained copies (``train.trained_dtype``, the master weights) under bf16 autocast, the
set-up docs/teachers.md recommends; ``bf16-pure`` -- the trained copies and their Adam states in bf16 too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# diffusers' SD1.5 UNet (stable-diffusion-v1-5/unet/config.json); block_out_channels is scaled by --width-scale
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
# SD1.5's scheduler (PNDM in the pipeline; fastgen reads only its noise schedule)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False)
TEXT_TOKENS = 77
GUIDANCE = {"dmd2": 1.75, "sid": 1.5}  # teacher CFG: DMD2 paper's SD1.5 value; SiD-LSG's SD1.5 value
METHODS = tuple(GUIDANCE)
WEIGHTS = ("full", "lora")
# precision -> (teacher dtype, recipe overrides)
PRECISIONS = {"fp32": (torch.float32, ["train.mixed_precision=no"]),
              "bf16": (torch.bfloat16, ["train.mixed_precision=bf16"]),
              "bf16-pure": (torch.bfloat16, ["train.mixed_precision=bf16", "train.trained_dtype=bf16"])}
GB = 2**30


@dataclass
class Row:
    """One measured configuration.

    Args:
        method: ``dmd2`` or ``sid``.
        weights: ``full`` (student and critic are trainable copies of the UNet) or ``lora`` (adapters on the one
            frozen teacher UNet).
        width: the factor on SD1.5's ``block_out_channels``.
        precision: a key of :data:`PRECISIONS`.
        checkpointing: ``train.gradient_checkpointing``.
        lora_rank: rank of the student's and the critic's adapters (``weights = "lora"``).
    """

    method: str
    weights: str
    width: float
    precision: str
    checkpointing: bool
    lora_rank: int = 64


def channels(width: float) -> tuple[int, ...]:
    """SD1.5's ``block_out_channels`` times ``width``; each must stay a multiple of the 32 norm groups."""
    scaled = tuple(round(c * width) for c in SD15_UNET["block_out_channels"])
    if not 0 < width <= 1 or any(c % SD15_UNET["norm_num_groups"] for c in scaled):
        raise ValueError(f"width scale {width}: must be in (0, 1] and give channels that are multiples of 32 "
                         f"(0.1, 0.2, ..., 1.0); got {scaled}.")
    return scaled


def sd15_unet(width: float):
    """An SD1.5-architecture ``UNet2DConditionModel`` at ``width`` with random (diffusers' default) weights."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**SD15_UNET, "block_out_channels": channels(width)})


def overrides(row: Row, steps: int) -> list[str]:
    """The ``--set`` overrides of the row's recipe (``<method>_1step``)."""
    sets = [f"{row.method}.guidance_scale={GUIDANCE[row.method]}", f"train.steps={steps}", "train.batch_size=1",
            "train.log_every=1", "train.progress=false", "train.checkpoint_every=0",
            f"train.gradient_checkpointing={'true' if row.checkpointing else 'false'}", *PRECISIONS[row.precision][1]]
    if row.method == "dmd2":
        sets.append("dmd2.ratio=1")  # every timed iteration updates both generator and critic (the memory peak)
    if row.weights == "lora":
        sets += [f"student.lora_rank={row.lora_rank}", f"critic.lora_rank={row.lora_rank}"]
    return sets


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_bytes(device: torch.device) -> int:
    """The peak memory so far: CUDA's peak allocation, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return peak if sys.platform == "darwin" else peak * 1024


def storage_bytes(tensors) -> int:
    """Bytes of ``tensors``, each storage once (the LoRA teacher, student and critic share one base)."""
    seen = {}
    for t in tensors:
        seen.setdefault(t.data_ptr(), t.numel() * t.element_size())
    return sum(seen.values())


def measure(row: Row, warmup: int, steps: int) -> dict:
    """Build the row's method on a random SD1.5-architecture UNet and train ``warmup + steps`` iterations with
    fastgen's trainer; returns its memory and timing (this process must measure nothing else)."""
    from fastgen.denoiser import Conditioning
    from fastgen.lora import AdapterDenoiser
    from fastgen.methods import Batch
    from fastgen.pipelines.sampler import student_timesteps
    from fastgen.schedule import VPSchedule
    from fastgen.train.recipes import load_recipe
    from fastgen.train.runner import build_trainer

    baseline = rss_bytes()
    torch.manual_seed(0)
    dtype = PRECISIONS[row.precision][0]
    unet = sd15_unet(row.width).to(dtype).requires_grad_(False).eval()
    schedule = VPSchedule.from_scheduler_config(SD15_SCHEDULER)
    teacher = AdapterDenoiser(unet, schedule, None, unet.config.sample_size)  # as build_method wraps a pipeline's
    cfg = load_recipe(f"{row.method}_1step", overrides(row, warmup + steps))
    timesteps = student_timesteps(schedule, cfg.student.num_steps, cfg.method_class.sampler)
    method = cfg.method_class(teacher, timesteps, cfg.options, student=cfg.student, critic=cfg.critic)
    embeddings = torch.randn(2, 1, TEXT_TOKENS, SD15_UNET["cross_attention_dim"], dtype=dtype)
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(cfg, method, Path(out), trackers=False)
        device = trainer.device
        batch = Batch(1, cond=Conditioning(embeddings[0]), uncond=Conditioning(embeddings[1])).to(device)
        built = peak_bytes(device) if device.type == "cuda" else rss_bytes()
        summary = trainer.train(itertools.repeat(batch))
        trainer.end()
    peak = peak_bytes(device)
    trained = [p for group in trainer.groups.values() for p in group]
    states = [t for opt in trainer.optimizers.values() for s in getattr(opt, "optimizer", opt).state.values()
              for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    weights, grads, adam = storage_bytes(method.parameters()), storage_bytes(trained), storage_bytes(states)
    base = 0 if device.type == "cuda" else baseline
    timed = [record["s_per_step"] for record in trainer.history[warmup:]]
    return {**asdict(row), "status": "ok", "block_out_channels": list(channels(row.width)),
            "unet_parameters_M": sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n) / 1e6,
            "trained_parameters_M": sum(p.numel() for p in trained) / 1e6,
            "recipe": f"{row.method}_1step", "overrides": overrides(row, warmup + steps),
            "mixed_precision": summary["mixed_precision"],
            "baseline_gb": baseline / GB, "after_build_gb": built / GB, "peak_gb": peak / GB,
            "weights_gb": weights / GB, "grads_gb": grads / GB, "adam_gb": adam / GB,
            "activations_gb": (peak - base - weights - grads - adam) / GB,
            "s_per_step": sum(timed) / len(timed), "step_seconds": [r["s_per_step"] for r in trainer.history],
            "device": str(device), "threads": torch.get_num_threads()}


def run_row(row: Row, warmup: int, steps: int, max_rss_gb: float, timeout: float) -> dict:
    """:func:`measure` in a fresh process (one thread), stopped when its resident set passes ``max_rss_gb``."""
    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "--child", json.dumps(asdict(row)), "--warmup", str(warmup),
           "--steps", str(steps)]
    start, high = time.time(), 0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        status = None
        while proc.poll() is None:
            try:
                rss = psutil.Process(proc.pid).memory_info().rss
            except psutil.NoSuchProcess:
                break
            high = max(high, rss)
            if rss > max_rss_gb * GB:
                status = f"over {max_rss_gb:g} GB"
            elif time.time() - start > timeout:
                status = f"over {timeout:g} s"
            if status:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        lines = out.read().strip().splitlines()
        if status is None and proc.returncode == 0 and lines:
            return {**json.loads(lines[-1]), "wall_s": time.time() - start}
        last = (err.read().strip().splitlines() or [""])[-1]
        status = status or f"failed (exit {proc.returncode}): {last}"
    return {**asdict(row), "status": status, "block_out_channels": list(channels(row.width)),
            "peak_gb": high / GB, "wall_s": time.time() - start}


def plan(args) -> list[Row]:
    """The rows: full-weight ones at ``--width-scale``, LoRA ones at each of ``--lora-width-scales``."""
    rows = []
    for method, weights, precision, checkpointing in itertools.product(
            args.methods, args.weights, args.precisions, args.checkpointing):
        widths = [args.width_scale] if weights == "full" else args.lora_width_scales
        rows += [Row(method, weights, w, precision, checkpointing, args.lora_rank) for w in widths]
    return rows


def fmt(value, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    """The table: one line per row, with its LoRA / full-weight peak ratio where a full-weight row matches."""
    rows = result["rows"]
    full = {(r["method"], r["width"], r["precision"], r["checkpointing"]): r for r in rows
            if r["weights"] == "full" and r["status"] == "ok"}
    lines = ["| method | student + critic | width (block_out_channels) | precision | grad. ckpt | trained params (M) | "
             "weights GB | grads + Adam GB | activations etc. GB | peak GB | LoRA / full peak | s/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        who = "full copies" if r["weights"] == "full" else f"LoRA r{r['lora_rank']}"
        where = f"{r['width']:g} ({', '.join(map(str, r['block_out_channels']))})"
        head = f"| {r['method']} | {who} | {where} | {r['precision']} | {'yes' if r['checkpointing'] else 'no'} |"
        if r["status"] != "ok":
            lines.append(f"{head} | | | | | did not fit: {r['status']} | | |")
            continue
        match = full.get((r["method"], r["width"], r["precision"], r["checkpointing"]))
        ratio = fmt(r["peak_gb"] / match["peak_gb"]) if match and r["weights"] == "lora" else ""
        lines.append(f"{head} {r['trained_parameters_M']:.1f} | {fmt(r['weights_gb'])} | "
                     f"{fmt(r['grads_gb'] + r['adam_gb'])} | {fmt(r['activations_gb'])} | {fmt(r['peak_gb'])} | "
                     f"{ratio} | {fmt(r['s_per_step'], 1)} |")
    return "\n".join(lines) + "\n"


def csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", type=csv(str), default=list(METHODS), help="comma-separated: dmd2,sid")
    parser.add_argument("--weights", type=csv(str), default=list(WEIGHTS), help="comma-separated: full,lora")
    parser.add_argument("--precisions", type=csv(str), default=["fp32", "bf16"],
                        help=f"comma-separated: {','.join(PRECISIONS)}")
    parser.add_argument("--checkpointing", type=csv(lambda x: x == "on"), default=[False, True],
                        help="comma-separated: off,on (gradient checkpointing)")
    parser.add_argument("--width-scale", type=float, default=1.0, help="width of the full-weight rows "
                        "(factor on SD1.5's block_out_channels: 0.1, 0.2, ..., 1.0)")
    parser.add_argument("--lora-width-scales", type=csv(float), default=[1.0],
                        help="comma-separated widths of the LoRA rows (add --width-scale's for the LoRA / full ratio)")
    parser.add_argument("--lora-rank", type=int, default=64, help="rank of the student's and critic's adapters")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--steps", type=int, default=2, help="timed iterations")
    parser.add_argument("--max-rss-gb", type=float, default=15.0, help="stop a row whose process grows past this")
    parser.add_argument("--timeout", type=float, default=900.0, help="stop a row that runs longer (seconds)")
    parser.add_argument("--out", default="bench/memory", help="folder for memory.json and memory.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure this one row (JSON) and print it
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(Row(**json.loads(args.child)), args.warmup, args.steps)), flush=True)
        return None
    for name, values, valid in (("--methods", args.methods, METHODS), ("--weights", args.weights, WEIGHTS),
                                ("--precisions", args.precisions, tuple(PRECISIONS))):
        bad = [v for v in values if v not in valid]
        if bad or not values:
            parser.error(f"{name} {','.join(bad)}: choose from {', '.join(valid)}")
    if args.warmup < 0 or args.steps < 1:
        parser.error(f"--warmup must be >= 0 and --steps >= 1, got {args.warmup} and {args.steps}")
    try:
        for width in [args.width_scale, *args.lora_width_scales]:
            channels(width)
    except ValueError as err:
        parser.error(str(err))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for row in plan(args):
        rows.append(run_row(row, args.warmup, args.steps, args.max_rss_gb, args.timeout))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "step_seconds"}), flush=True)
    result = {"command": " ".join(["python", "scripts/bench_memory.py", *(argv if argv is not None else sys.argv[1:])]),
              "warmup": args.warmup, "steps": args.steps, "machine": f"{platform.machine()} {cpu_name()}",
              "cpus": os.cpu_count(), "torch": torch.__version__, "load_average": os.getloadavg(), "rows": rows}
    (out / "memory.json").write_text(json.dumps(result, indent=1))
    (out / "memory.md").write_text(markdown(result))
    print(markdown(result))
    return result


def cpu_name() -> str:
    """The CPU's model name (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
