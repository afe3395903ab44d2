"""The ``fastgen`` command: a thin dispatcher into fastgen.train, fastgen.eval and fastgen.pipelines.

The top layer of the package: the only place that composes training and evaluation (``fastgen demo``,
evaluation during training; the Python API in :mod:`.api`). Every subcommand parses its options here and calls
one function elsewhere; ``fastgen CMD --help`` describes every option.

One vocabulary across commands: ``--num-inference-steps`` (short ``--steps``) counts sampling steps and only
them; ``--train-steps`` counts training iterations (``--steps`` on ``demo`` and ``zoo train`` is a deprecated
spelling of it that warns); every command that samples takes ``--seed``, ``--device`` and ``--prompts``.
"""

from __future__ import annotations

import argparse
import json
import sys

ALLOW_PICKLE_HELP = ("also load pickled .bin weight files where a pipeline has no safetensors (pickles can run code "
                     "when loaded: only for folders from a source you trust)")
DEVICE_HELP = "torch device of the pipelines: cpu, cuda, cuda:1, mps, ... (default: cpu)"
PROMPTS_HELP = ("text-to-image pipelines: a text file with one prompt per line, cycled (default: the zoo's class "
                "prompts; prompt accuracy and the per-class FD need them and are left out with others)")
GUIDANCE_OPTIONS = ("--guidance", "--guidance-scale")


class _Deprecated(argparse.Action):
    """An old spelling of an option: stores into the new option's ``dest`` and warns on stderr (hidden in --help)."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated here; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _sampling_options(parser: argparse.ArgumentParser, prompts: bool = True) -> None:
    """``--seed``, ``--device`` and ``--prompts``: the same three options on every command that samples."""
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    if prompts:
        parser.add_argument("--prompts", default=None, metavar="FILE", help=PROMPTS_HELP)


def _loading_options(parser: argparse.ArgumentParser) -> None:
    """How the teacher (or evaluated pipeline) is loaded: the recipe's ``[loading]`` keys as options."""
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                        help="torch dtype of the pipeline's networks (default: fp32; train: loading.dtype)")
    parser.add_argument("--variant", default=None, help="weight-file variant, e.g. fp16 (loading.variant)")
    parser.add_argument("--revision", default=None, help="hub revision: branch, tag or commit (loading.revision)")
    parser.add_argument("--component", action="append", default=[], metavar="NAME=none|FOLDER|FILE",
                        help="replace a component: text_encoder_3=none drops T5 from SD3, vae=FOLDER loads another, "
                             "transformer=FILE.safetensors converts one from a single file in its original layout, "
                             "e.g. a Flux transformer (repeatable; loading.components)")
    parser.add_argument("--single-file-config", default=None, metavar="FOLDER",
                        help="for a single-file checkpoint (.safetensors) as the pipeline: the diffusers pipeline "
                             "folder whose configs convert it (loading.single_file_config)")
    parser.add_argument("--attention", default=None, choices=["sdpa", "xformers"],
                        help="attention: sdpa (PyTorch, default) or xformers (CUDA + xformers; else sdpa with a "
                             "note; loading.attention)")


def _loading_values(args) -> dict:
    """The ``[loading]`` keys given as options (``--component`` as a dict)."""
    values = {key: getattr(args, key) for key in ("dtype", "variant", "revision", "single_file_config", "attention")
              if getattr(args, key) is not None}
    components = {}
    for item in args.component:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"--component {item!r} must look like NAME=none or NAME=FOLDER, e.g. text_encoder_3=none.")
        components[name] = value
    if components:
        values["components"] = components
    return values


def _load_options(args):
    from fastgen.pipelines.loading import LoadOptions

    return LoadOptions(**_loading_values(args))


def _zoo(args) -> int:
    from fastgen import zoo

    if args.zoo_cmd == "list":
        for name, text in zoo.TEACHERS.items():
            try:
                where = str(zoo.path(name))
            except FileNotFoundError:
                where = "(no weights: run `fastgen zoo train %s`)" % name
            print(f"{name:12s} {text}\n{'':12s} {where}")
        return 0
    if args.zoo_cmd == "path":
        print(zoo.path(args.name))
        return 0
    if args.zoo_cmd == "train":
        from fastgen.train.teachers import train_teacher

        out = train_teacher(args.name, out=args.out, replace_installed=args.replace_installed, seed=args.seed,
                            steps=args.train_steps, vae_steps=args.vae_train_steps, batch_size=args.batch_size)
        if not args.no_card:
            from fastgen.train.cards import write_card

            write_card(args.name, out)
        print(f"wrote {out}")
        return 0
    if args.zoo_cmd == "card":
        from fastgen.train.cards import write_card

        folder = zoo.path(args.name) if args.replace_installed else args.out or zoo.USER_DIR / args.name
        if args.replace_installed and args.out:
            raise ValueError("Give --out or --replace-installed, not both.")
        print(f"wrote {write_card(args.name, folder)}")
        return 0
    raise AssertionError(args.zoo_cmd)


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, train_steps=args.train_steps, num_images=args.num_images, seed=args.seed,
             guidance_scale=args.guidance, overrides=args.set, device=args.device, prompts=args.prompts)
    return 0


def _ints(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{option} expects comma-separated whole numbers, got {text!r}.") from None


def _timesteps(text: str | None) -> list | None:
    """``--timesteps``: comma-separated numbers, ints where whole (the pipeline, once loaded, checks its kind: whole
    numbers in [0, T-1] for DDPM-family pipelines, any t = sigma T in (0, T] for flow ones)."""
    if text is None:
        return None

    def number(token: str):
        try:
            return int(token)
        except ValueError:
            return float(token)

    try:
        return [number(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--timesteps expects comma-separated numbers (e.g. 999,499; flow pipelines: t = sigma T, "
                         f"e.g. 1000.0,662.7), got {text!r}.") from None


def _scoring_options(parser) -> None:
    """The metric options ``eval`` and ``bench`` share."""
    parser.add_argument("--metrics", default=None,
                        help="comma-separated subset of fd,kid,fd_class,fd_pixel,precision,recall,density,coverage,"
                             "fd_groups,acc,fid,clip,speed (default: all but fd_groups, fid and clip; bench adds fid "
                             "with --fid-reference; the domain metrics are skipped for pipelines outside the zoo; "
                             "see docs/evaluation.md)")
    parser.add_argument("--fid-reference", default=None,
                        help="for fid: a folder of real images, a .npz of their clean-fid statistics "
                             "(fastgen.eval.metrics.clean_fid_stats), a clean-fid dataset as NAME:RES[:SPLIT], e.g. "
                             "cifar10:32:train, or clean-fid custom statistics as NAME:custom "
                             "(cleanfid.fid.make_custom_stats; statistics files must be in clean-fid's stats folder: "
                             "not downloaded)")
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip model for clip (default: ViT-B-32)")
    parser.add_argument("--clip-pretrained", default="openai",
                        help="open_clip pretrained tag or checkpoint file (default: openai)")


def _eval(args) -> int:
    from fastgen.eval.evaluate import DEFAULT_METRICS, evaluate, metrics_markdown

    result = evaluate(args.target, steps=args.num_inference_steps, timesteps=_timesteps(args.timesteps),
                      guidance=args.guidance,
                      num_images=args.num_images, metrics=args.metrics or DEFAULT_METRICS, out=args.out,
                      solver=args.solver, batch_size=args.batch_size, seed=args.seed, fid_reference=args.fid_reference,
                      clip_model=args.clip_model, clip_pretrained=args.clip_pretrained, device=args.device,
                      allow_pickle=args.allow_pickle, prompts=args.prompts, gamma=args.gamma, eta=args.eta,
                      loading=_load_options(args), seeds=_ints(args.seeds, "--seeds"))
    print(metrics_markdown(result))
    if args.out:
        print(f"wrote {args.out}/metrics.json, metrics.md and samples.png")
    return 0


def _bench(args) -> int:
    from fastgen.eval.bench import bench, bench_markdown

    solvers = args.solvers.split(",") if args.solvers is not None else None
    result = bench(args.teacher, students=args.students, solvers=solvers,
                   nfes=_ints(args.nfes, "--nfes"), num_images=args.num_images, guidance=args.guidance, out=args.out,
                   seed=args.seed, batch_size=args.batch_size, allow_pickle=args.allow_pickle, device=args.device,
                   prompts=args.prompts, metrics=args.metrics, fid_reference=args.fid_reference,
                   clip_model=args.clip_model, clip_pretrained=args.clip_pretrained, loading=_load_options(args),
                   resolution=args.resolution)
    print(bench_markdown(result))
    print(f"wrote {args.out}/bench.md, bench.json and bench.png")
    return 0


def _compare(args) -> int:
    from fastgen.eval.compare import compare_markdown, compare_runs

    labels = args.labels.split(",") if args.labels else None
    result = compare_runs(args.runs, args.out, teacher_fd=args.teacher_fd, fd_bar=args.fd_bar, labels=labels)
    print(compare_markdown(result))
    print(f"wrote {args.out}/compare.md, compare.json and compare.png")
    return 0


def _train(args) -> int:
    from fastgen.eval.evaluate import training_evaluator
    from fastgen.train.runner import run_training

    shortcuts = [f"{key}={value}" for key, value in (("train.steps", args.train_steps), ("seed", args.seed),
                                                      ("data.prompts", args.prompts)) if value is not None]
    for key, value in _loading_values(args).items():
        value = "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + "}" if key == "components" \
            else json.dumps(value)
        shortcuts.append(f"loading.{key}={value}")
    run_training(args.recipe, overrides=[*args.set, *shortcuts], teacher=args.teacher, out=args.out,
                 resume=args.resume, evaluate_folder=training_evaluator, allow_pickle=args.allow_pickle)
    return 0


def _export(args) -> int:
    from fastgen.train.runner import export_checkpoint

    export_checkpoint(args.run, out=args.out, teacher=args.teacher, allow_pickle=args.allow_pickle)
    return 0


class _TrainHelp(argparse.RawDescriptionHelpFormatter):
    """``fastgen train --help`` lists every method's options; building that list imports the methods (and
    torch), so it is done only when this help is printed."""

    def format_help(self) -> str:
        from fastgen.train.recipes import available_recipes, describe_options

        return (super().format_help() + "\nshipped recipes: " + ", ".join(available_recipes()) +
                "\n\nrecipe keys (override with --set KEY=VALUE; optimizer keys as optim.GROUP.KEY):\n" +
                describe_options() + "\n")


def _classifier(args) -> int:
    from fastgen.eval.classifiers import train_classifier

    folder = train_classifier(args.name, args.out, seed=args.seed, epochs=args.epochs,
                              replace_installed=args.replace_installed)
    print(f"wrote {folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fastgen import __version__

    parser = argparse.ArgumentParser(prog="fastgen", description=(
        "Diffusion step-distillation on diffusers: train 1-4 step students, export them as plain "
        "diffusers pipelines, and measure them."))
    parser.add_argument("--version", action="version", version=f"fastgen {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="Distill fmnist-ldm into a 1-step DMD2 student and compare it with the teacher.",
                          description="Distill the fmnist-ldm teacher into a 1-step student with data-free DMD2 "
                                      "(recipe dmd2_fmnist_1step), export it as a plain diffusers folder, evaluate "
                                      "teacher (50 steps), teacher (1 step) and student (1 step), print the table and "
                                      "write it with a comparison grid to --out. A killed demo resumes.")
    demo.add_argument("--out", default="fastgen-demo", help="output folder (default: fastgen-demo)")
    demo.add_argument("--train-steps", type=int, default=2500,
                      help="DMD2 training steps (default: 2500, about 9 minutes on 2 CPU cores)")
    demo.add_argument("--steps", dest="train_steps", type=int, action=_Deprecated, new="--train-steps")
    demo.add_argument("--num-images", type=int, default=1000, help="images per evaluated sampler (default: 1000)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key of the dmd2_fmnist_1step recipe (see `fastgen train --help`), repeatable")
    demo.add_argument(*GUIDANCE_OPTIONS, dest="guidance", type=float, default=None,
                      help="the teacher's guidance scale in its evaluation rows (default: its recommended one); "
                           "training uses the recipe's (--set dmd2.guidance_scale=W)")
    _sampling_options(demo)
    demo.set_defaults(func=_demo)

    ev = sub.add_parser("eval", help="Generate with a pipeline and score it (FD, KID, per-class FD, pixel FD, "
                                     "precision/recall, density/coverage, accuracy, FID, CLIP, speed).",
                        description="Generate images with a diffusers pipeline (zoo name, folder or hub id) through "
                                    "its own __call__, score them, and write metrics.json, metrics.md and a sample "
                                    "grid. Exported fastgen students are called as their metadata says.")
    ev.add_argument("target", help="zoo teacher name, pipeline folder (e.g. an exported student) or hub id")
    ev.add_argument("--num-inference-steps", "--steps", dest="num_inference_steps", type=int, default=None,
                    help="number of inference (sampling) steps (default: a student's own)")
    ev.add_argument("--timesteps", default=None,
                    help="explicit comma-separated timesteps, e.g. 999,499 (flow pipelines, SD3 / Flux: continuous "
                         "t = sigma T, e.g. 1000.0,662.7)")
    ev.add_argument(*GUIDANCE_OPTIONS, dest="guidance", type=float, default=None,
                    help="classifier-free guidance scale (default: the student's, or the teacher's recommended)")
    ev.add_argument("--solver", default=None, choices=["ddim", "dpm++2m", "unipc", "euler"],
                    help="replace the pipeline's scheduler by this training-free solver")
    ev.add_argument("--gamma", type=float, default=None,
                    help="sample with diffusers' TCDScheduler at this gamma in [0, 1] (TCD's strategic stochastic "
                         "sampling; 0: deterministic), passed as the call's eta: an inference option of "
                         "consistency students (cd, lcm)")
    ev.add_argument("--eta", type=float, default=None,
                    help="DDIM's stochasticity in [0, 1] (0: deterministic, 1: DDPM's variance), passed as the call's "
                         "eta to a DDIMScheduler: an inference option of progressive students")
    ev.add_argument("--num-images", type=int, default=1000, help="images to generate (default: 1000)")
    ev.add_argument("--out", default=None, help="output folder for metrics.json, metrics.md, samples.png")
    ev.add_argument("--batch-size", type=int, default=100, help="images per pipeline call (default: 100)")
    _sampling_options(ev)
    ev.add_argument("--seeds", default=None, metavar="S,S,...",
                    help="evaluate once per seed (e.g. 0,1,2,3,4; --num-images each) instead of --seed, and report "
                         "each metric's mean and standard deviation over them: at a few thousand images FD moves "
                         "with the seed alone")
    _scoring_options(ev)
    _loading_options(ev)
    ev.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    ev.set_defaults(func=_eval)

    be = sub.add_parser("bench", help="Quality-vs-NFE frontier: teacher solvers at NFE 1-50 and students.",
                        description="Run the teacher with training-free solvers (DDIM, DPM-Solver++ 2M, UniPC, "
                                    "Euler) at each NFE and each student at its own steps; write one Markdown "
                                    "table, a JSON file and a plot of FD and recall (teachers outside the zoo: "
                                    "FID, CLIP score or speed) against NFE.")
    be.add_argument("teacher", help="zoo teacher name, pipeline folder or hub id (the domain metrics need a zoo "
                                    "teacher; they are skipped for others)")
    be.add_argument("--students", nargs="*", default=[], help="exported student folders to add")
    be.add_argument("--solvers", default=None, help="comma-separated solvers (default: ddim,dpm++2m,unipc,euler; "
                                                  "flow teachers: dpm++2m,unipc,euler, DDIM being Euler there)")
    be.add_argument("--nfes", default="1,2,4,8,16,50",
                    help="comma-separated inference step counts of the teacher's solvers (default: 1,2,4,8,16,50)")
    be.add_argument("--num-images", type=int, default=1000, help="images per row (default: 1000)")
    be.add_argument(*GUIDANCE_OPTIONS, dest="guidance", type=float, default=None,
                    help="teacher guidance (default: the recommended one)")
    be.add_argument("--out", default="bench", help="output folder (default: bench)")
    be.add_argument("--batch-size", type=int, default=200, help="images per pipeline call (default: 200)")
    be.add_argument("--resolution", type=int, default=None, metavar="PIXELS",
                    help="image height = width of every row, for pipelines whose call defaults to "
                         "default_sample_size (SDXL, SD3, Flux; FluxPipeline's default is 1024); default: the "
                         "students' trained resolution (fastgen.json), else the teacher pipeline's default")
    _sampling_options(be)
    _scoring_options(be)
    _loading_options(be)
    be.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    be.set_defaults(func=_bench)

    co = sub.add_parser("compare", help="Which method reaches the teacher first: training runs' metrics against "
                                        "training minutes.",
                        description="Read eval.jsonl of training runs evaluated during training (train.eval_every) "
                                    "and write one table (compare.md), compare.json and a plot of FD, recall and "
                                    "accuracy against training minutes (compare.png). Compare runs trained on the "
                                    "same machine at the same time with the same batch size.")
    co.add_argument("runs", nargs="+", help="training run folders (with eval.jsonl)")
    co.add_argument("--out", default="compare", help="output folder (default: compare)")
    co.add_argument("--teacher-fd", type=float, default=None,
                    help="the teacher's FD at the runs' evaluation size (train.eval_images), for the bar column")
    co.add_argument("--fd-bar", type=float, default=1.25, help="the bar as a multiple of --teacher-fd (default 1.25)")
    co.add_argument("--labels", default=None, help="comma-separated names of the runs (default: the folder names)")
    co.set_defaults(func=_compare)

    tr = sub.add_parser("train", help="Distill a student from a recipe (TOML) and export it as a diffusers folder.",
                        formatter_class=_TrainHelp,
                        description="Train a student as a recipe says (train/recipes/*.toml, or a TOML file), with "
                                    "checkpoints, EMA, progress bar and trackers through accelerate, then export it "
                                    "to OUT/student as a plain diffusers pipeline. Multi-GPU: `accelerate launch "
                                    "-m fastgen.cli train RECIPE ...` (device and mixed precision: accelerate's "
                                    "config, unless the recipe sets train.mixed_precision).")
    tr.add_argument("recipe", help="recipe name (e.g. dmd2_fmnist_1step), a TOML file, or a run's recipe.json "
                                   "(its run folder is then the default --out)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe key, e.g. --set train.steps=2000 --set optim.generator.lr=1e-4 (repeatable; "
                         "KEY=none unsets an optional key, e.g. --set sid.guidance_scale=none)")
    tr.add_argument("--train-steps", type=int, default=None, help="training iterations (same as --set train.steps=N)")
    tr.add_argument("--seed", type=int, default=None, help="random seed (same as --set seed=N)")
    tr.add_argument("--prompts", default=None, metavar="FILE",
                    help="training prompts, one per line, or 'zoo' (same as --set data.prompts=FILE)")
    tr.add_argument("--teacher", default=None, help="teacher: zoo name, diffusers pipeline folder or hub id")
    tr.add_argument("--out", default=None, help="run folder (default: the recipe's out, else runs/RECIPE)")
    tr.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                    help="continue the run in OUT from its latest checkpoint, or from CHECKPOINT (a folder "
                         "OUT/checkpoints/checkpoint-N; no later one may exist; its run is the default --out). The "
                         "run's recipe and teacher; train.steps and the checkpoint/log/eval settings may change "
                         "(recorded in OUT/resumes.jsonl). A complete run is exported again")
    _loading_options(tr)
    tr.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    tr.set_defaults(func=_train)

    ex = sub.add_parser("export", help="Export the student of a training run or checkpoint (no training).",
                        description="Export the student of a `fastgen train` run folder (its latest checkpoint) or of "
                                    "one of its checkpoint folders as a plain diffusers pipeline, exactly as training "
                                    "exports it at its end (EMA weights, LoRA fused), without training.")
    ex.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run folder, or RUN/checkpoints/checkpoint-N")
    ex.add_argument("--out", default=None, help="output folder (default: RUN/student-step-N)")
    ex.add_argument("--teacher", default=None,
                    help="the run's teacher, when it is no longer where RUN/recipe.json says (its weights are "
                         "checked against RUN/teacher.json)")
    ex.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    ex.set_defaults(func=_export)

    cl = sub.add_parser("classifier", help="Train a zoo domain classifier (for FD, KID and prompt accuracy).",
                        description="Train the digits or fmnist domain classifier from a fixed seed and write its "
                                    "weights, reference feature statistics and README to --out (default "
                                    "./zoo/classifiers/NAME; with --replace-installed, the installed "
                                    "fastgen/zoo/classifiers/NAME folder).")
    cl.add_argument("name", choices=["digits", "fmnist"], help="which classifier")
    cl.add_argument("--out", default=None, help="output folder (default: ./zoo/classifiers/NAME, never the installed "
                                                "package)")
    cl.add_argument("--replace-installed", action="store_true",
                    help="write into the installed fastgen/zoo/classifiers/NAME folder, replacing the shipped "
                         "classifier")
    cl.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    cl.add_argument("--epochs", type=int, default=None, help="epochs (default: the shipped recipe)")
    cl.set_defaults(func=_classifier)

    zoo_p = sub.add_parser("zoo", help="The tiny real teachers shipped with fastgen.",
                           description="List, locate, retrain or re-document the zoo's tiny teachers.")
    zsub = zoo_p.add_subparsers(dest="zoo_cmd", required=True, metavar="ZOO_COMMAND")
    zsub.add_parser("list", help="list the teachers and where their weights are",
                    description="List the zoo's teachers and the folders of their weights.")
    zpath = zsub.add_parser("path", help="print a teacher's folder", description="Print the diffusers folder of a teacher.")
    zpath.add_argument("name", help="teacher name (see `fastgen zoo list`)")
    ztrain = zsub.add_parser("train", help="retrain a teacher from its fixed seed",
                             description="Retrain a teacher from its fixed seed (reproduces the shipped weights) "
                                         "and write it with its model card and grids to --out (default ./zoo/NAME; "
                                         "the installed teacher only with --replace-installed).")
    ztrain.add_argument("name", help="teacher name (see `fastgen zoo list`)")
    ztrain.add_argument("--out", default=None, help="output folder (default: ./zoo/NAME, never the installed package)")
    ztrain.add_argument("--replace-installed", action="store_true",
                        help="write into the installed zoo folder, replacing the shipped teacher")
    ztrain.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    ztrain.add_argument("--train-steps", type=int, default=None, help="denoiser training steps (default: per teacher)")
    ztrain.add_argument("--steps", dest="train_steps", type=int, action=_Deprecated, new="--train-steps")
    ztrain.add_argument("--vae-train-steps", type=int, default=None, help="VAE training steps, fmnist-ldm only")
    ztrain.add_argument("--vae-steps", dest="vae_train_steps", type=int, action=_Deprecated, new="--vae-train-steps")
    ztrain.add_argument("--batch-size", type=int, default=None, help="batch size (default: 64)")
    ztrain.add_argument("--no-card", action="store_true", help="skip writing the model card and grids")
    zcard = zsub.add_parser("card", help="(re)write a teacher's model card and grids",
                            description="Write README.md and the sample grids of a trained teacher.")
    zcard.add_argument("name", help="teacher name (see `fastgen zoo list`)")
    zcard.add_argument("--out", default=None, help="teacher folder (default: ./zoo/NAME, where `zoo train` writes)")
    zcard.add_argument("--replace-installed", action="store_true",
                       help="write the installed teacher's card and grids instead")
    zoo_p.set_defaults(func=_zoo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (KeyError, FileNotFoundError, ValueError, TypeError, NotImplementedError, RuntimeError) as err:
        msg = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        msg = " ".join(line.strip() for line in msg.splitlines() if line.strip()) or type(err).__name__
        print(f"fastgen {args.cmd}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
