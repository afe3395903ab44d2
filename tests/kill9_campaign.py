"""A kill -9 campaign: SIGKILL a real `fastgen train` many times at random moments, resume after each kill, and
compare the final student with an uninterrupted run's.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python tests/kill9_campaign.py --kills 30 --out /tmp/kill9

The run is DMD2 (ratio 2, EMA) on a tiny DDPM teacher, a checkpoint every 2 steps. Each attempt is a fresh
`fastgen train` process (`--resume` once a complete checkpoint exists); it is killed by one of four triggers,
drawn at random:

* ``anywhere`` -- after a uniform random delay over the attempt's expected duration (start-up included);
* ``training`` -- a uniform random delay after the attempt has started training (it wrote ``recipe.json``);
* ``checkpoint`` -- as soon as a temporary checkpoint folder appears (polled every millisecond);
* ``export`` -- as soon as the temporary student folder appears.

Where a kill landed is read from the run folder after the process died: a temporary student folder left
(export), a temporary checkpoint folder left (checkpoint write), ``recipe.json`` rewritten by this attempt
(training; "before export" when the run had nothing left to train, "after export" when the new student is
complete too), else start-up. A kill that came after the
process had exited is not counted; a run that finishes is compared with the uninterrupted one and the next
run starts. A restart that fails (any exit status but 0 or SIGKILL) aborts the campaign. After the last kill
the run is resumed to the end; the report gives the kills by place, the partial checkpoints that were left
(and removed by the next start), and the largest absolute difference between each run's final checkpoint
and exported student and the uninterrupted run's (0: bit-identical). It is written to ``OUT/campaign.json``
and printed as Markdown (docs/reliability.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS_DEFAULT = 60


def write_inputs(out: Path, steps: int) -> tuple[Path, Path]:
    """The tiny teacher (tests/conftest.py's UNet) and the recipe."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler

    sys.path.insert(0, str(HERE))
    from conftest import tiny_recipe, tiny_unet

    teacher = out / "teacher"
    if not (teacher / "model_index.json").is_file():
        torch.manual_seed(0)
        DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(teacher)
    recipe = Path(tiny_recipe(out / "campaign.toml", ratio=2, ema_decay=0.9, steps=steps, batch_size=16,
                              checkpoint_every=2, log_every=10, critic_warmup=4))
    return teacher, recipe


def command(recipe: Path, teacher: Path, run: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "fastgen.cli", "train", str(recipe), "--teacher", str(teacher), "--out", str(run),
            *(["--resume"] if resume else [])]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def latest_step(run: Path) -> int:
    from fastgen.train.trainer import STATE_FILE, latest_checkpoint

    last = latest_checkpoint(run / "checkpoints")
    return json.loads((last / STATE_FILE).read_text())["step"] if last else 0


def leftovers(run: Path, since: float = 0.0) -> dict:
    """The temporary folders in ``run`` (written at or after ``since``: by the current attempt)."""
    found = {"checkpoint": list((run / "checkpoints").glob(".tmp-checkpoint-*")) if (run / "checkpoints").is_dir()
             else [], "export": [*run.glob(".tmp-student-*"), *run.glob(".old-student-*")]}
    return {kind: sorted(p.name for p in paths if _mtime(p) >= since) for kind, paths in found.items()}


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # renamed or removed by the running process since it was listed
        return -1.0


def landed(run: Path, started: float, trained: bool) -> str:
    """Where a kill landed, from what the dead process left in the run folder (a temporary folder a killed
    earlier attempt left, not yet removed, does not count)."""
    left = leftovers(run, since=started)
    if left["export"]:
        return "export"
    if left["checkpoint"]:
        return "checkpoint write"
    recipe = run / "recipe.json"
    if recipe.is_file() and recipe.stat().st_mtime >= started:
        student = run / "student" / "model_index.json"
        if student.is_file() and student.stat().st_mtime >= started:
            return "after export"
        return "before export" if trained else "training"  # a finished run's resume trains nothing
    return "start-up"


def wait_for(predicate, proc, timeout: float, poll: float = 0.001) -> bool:
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if predicate():
            return True
        time.sleep(poll)
    return False


def weights_difference(a: Path, b: Path, steps: int) -> dict:
    """Largest absolute difference of the final checkpoint's and the student's tensors between two runs."""
    from safetensors.torch import load_file

    out = {}
    for name, rel in (("checkpoint", f"checkpoints/checkpoint-{steps:07d}/model.safetensors"),
                      ("student", "student/unet/diffusion_pytorch_model.safetensors")):
        x, y = load_file(str(a / rel)), load_file(str(b / rel))
        assert x.keys() == y.keys(), f"{rel}: different tensors"
        out[name] = {"tensors": len(x), "max_abs_diff": max(float((x[k] - y[k]).abs().max()) for k in x),
                     "bit_equal": all(bool((x[k] == y[k]).all()) for k in x)}
    return out


def campaign(out: Path, kills: int, seed: int, steps: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    teacher, recipe = write_inputs(out, steps)
    rng = random.Random(seed)

    reference = out / "reference"
    t0 = time.time()
    done = subprocess.run(command(recipe, teacher, reference, resume=False), env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    wall = time.time() - t0
    log = json.loads((reference / "train_log.json").read_text())
    startup = max(wall - log["wall_s"], 1.0)
    per_step = log["s_per_step"]

    attempts, counts, partial_seen, chains = [], {}, 0, []
    run = out / "run-0"
    while sum(a["killed"] for a in attempts) < kills:
        resume = latest_step(run) > 0
        remaining = steps - latest_step(run)
        expected = startup + remaining * per_step + 0.5
        trigger = rng.choices(["anywhere", "training", "checkpoint", "export"], weights=[3, 3, 3, 1])[0]
        started = time.time()
        proc = subprocess.Popen(command(recipe, teacher, run, resume), env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        if trigger == "anywhere":
            wait_for(lambda: False, proc, rng.uniform(0, expected), poll=0.01)
        elif trigger == "training":
            recipe_json = run / "recipe.json"
            if wait_for(lambda: recipe_json.is_file() and recipe_json.stat().st_mtime >= started, proc, 600, 0.01):
                wait_for(lambda: False, proc, rng.uniform(0, remaining * per_step), poll=0.01)
        elif trigger == "checkpoint":
            wait_for(lambda: bool(leftovers(run, since=started)["checkpoint"]), proc, 600)
        else:
            wait_for(lambda: bool(leftovers(run, since=started)["export"]), proc, 600)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        record = {"run": run.name, "trigger": trigger, "resume": resume, "from_step": steps - remaining,
                  "returncode": proc.returncode, "killed": killed and proc.returncode == -signal.SIGKILL}
        if record["killed"]:
            record["landed"] = landed(run, started, trained=remaining == 0)
            record["left"] = leftovers(run, since=started)
            record["step_after"] = latest_step(run)
            counts[record["landed"]] = counts.get(record["landed"], 0) + 1
            partial_seen += len(record["left"]["checkpoint"])
        elif proc.returncode != 0:
            raise RuntimeError(f"attempt {len(attempts)} failed with {proc.returncode}: {err[-2000:]}")
        else:  # the run finished before its kill: compare it, then start the next one
            chains.append(finish(run, reference, steps, finished=True))
            run = out / f"run-{len(chains)}"
        attempts.append(record)
        print(json.dumps(record), flush=True)
    if run.exists():
        chains.append(finish(run, reference, steps, finished=False, command_args=(recipe, teacher)))
    worst = {part: max(c["difference"][part]["max_abs_diff"] for c in chains) for part in ("checkpoint", "student")}
    result = {"kills": sum(a["killed"] for a in attempts), "attempts": len(attempts) + (not chains[-1]["finished"]),
              "runs": len(chains), "landed": counts, "partial_checkpoints_left_by_kills": partial_seen,
              "left_at_end": [c["left"] for c in chains],
              "failed_restarts": sum(1 for a in attempts if not a["killed"] and a["returncode"] != 0),
              "worst_max_abs_diff": worst, "bit_equal": all(c["bit_equal"] for c in chains), "steps": steps,
              "reference_wall_s": round(wall, 1), "seed": seed, "chains": chains, "attempt_log": attempts}
    (out / "campaign.json").write_text(json.dumps(result, indent=1))
    return result


def finish(run: Path, reference: Path, steps: int, finished: bool, command_args=None) -> dict:
    """Resume ``run`` to the end unless ``finished``; its weights against the reference."""
    if not finished:
        recipe, teacher = command_args
        done = subprocess.run(command(recipe, teacher, run, resume=latest_step(run) > 0), env=env(),
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    difference = weights_difference(reference, run, steps)
    return {"run": run.name, "finished": finished, "difference": difference, "left": leftovers(run),
            "bit_equal": all(v["bit_equal"] for v in difference.values())}


def markdown(result: dict) -> str:
    rows = "\n".join(f"| {place} | {n} |" for place, n in sorted(result["landed"].items(), key=lambda kv: -kv[1]))
    worst = result["worst_max_abs_diff"]
    left = sum(len(v) for c in result["left_at_end"] for v in c.values())
    return (f"{result['kills']} kills over {result['attempts']} processes and {result['runs']} runs (DMD2, "
            f"{result['steps']} steps each, kill schedule seed {result['seed']}); restarts that failed: "
            f"{result['failed_restarts']}.\n\n| where the kill landed | kills |\n|---|---:|\n{rows}\n\n"
            f"Partial checkpoint folders left by kills: {result['partial_checkpoints_left_by_kills']} (left after the "
            f"runs ended: {left}). Largest absolute weight difference from the uninterrupted run, over every run: "
            f"final checkpoint {worst['checkpoint']:g}, exported student {worst['student']:g} (bit-identical: "
            f"{result['bit_equal']}).\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=30, help="SIGKILLs to deliver (default 30)")
    parser.add_argument("--out", default="kill9-campaign", help="working folder (default: kill9-campaign)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule (default 0)")
    parser.add_argument("--steps", type=int, default=STEPS_DEFAULT, help=f"training steps (default {STEPS_DEFAULT})")
    args = parser.parse_args(argv)
    result = campaign(Path(args.out), args.kills, args.seed, args.steps)
    print(markdown(result))
    left = any(v for c in result["left_at_end"] for v in c.values())
    return 0 if result["failed_restarts"] == 0 and result["bit_equal"] and not left else 1


if __name__ == "__main__":
    sys.exit(main())
