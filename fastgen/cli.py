"""The ``fastgen`` command: a thin dispatcher into fastgen.train, fastgen.eval and fastgen.pipelines.

Every subcommand parses its options here and calls one function elsewhere; ``fastgen CMD --help``
describes every option.
"""

from __future__ import annotations

import argparse
import sys


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

        out = train_teacher(args.name, out=args.out, seed=args.seed, steps=args.steps, vae_steps=args.vae_steps,
                            batch_size=args.batch_size)
        if not args.no_card:
            from fastgen.train.cards import write_card

            write_card(args.name, out)
        print(f"wrote {out}")
        return 0
    if args.zoo_cmd == "card":
        from fastgen.train.cards import write_card

        print(f"wrote {write_card(args.name, args.out or zoo.path(args.name))}")
        return 0
    raise AssertionError(args.zoo_cmd)


def _demo(args) -> int:
    from fastgen.train.demo import run_demo

    run_demo(out=args.out, num_images=args.num_images, seed=args.seed, guidance_scale=args.guidance)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgen", description=(
        "Diffusion step-distillation on diffusers: train 1-4 step students, export them as plain "
        "diffusers pipelines, and measure them."))
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="Sample the fmnist-ldm teacher at 1, 2, 4 and 50 steps; write a grid and timings.",
                          description="Sample the fmnist-ldm teacher at 1, 2, 4 and 50 DDIM steps, write a "
                                      "comparison grid PNG and a summary (steps, seconds per image) to --out.")
    demo.add_argument("--out", default="fastgen-demo", help="output folder (default: fastgen-demo)")
    demo.add_argument("--num-images", type=int, default=2, help="images per class in the grid (default: 2)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--guidance", type=float, default=None,
                      help="classifier-free guidance scale (default: the teacher's recommended one)")
    demo.set_defaults(func=_demo)

    zoo_p = sub.add_parser("zoo", help="The tiny real teachers shipped with fastgen.",
                           description="List, locate, retrain or re-document the zoo's tiny teachers.")
    zsub = zoo_p.add_subparsers(dest="zoo_cmd", required=True, metavar="ZOO_COMMAND")
    zsub.add_parser("list", help="list the teachers and where their weights are",
                    description="List the zoo's teachers and the folders of their weights.")
    zpath = zsub.add_parser("path", help="print a teacher's folder", description="Print the diffusers folder of a teacher.")
    zpath.add_argument("name", help="teacher name (see `fastgen zoo list`)")
    ztrain = zsub.add_parser("train", help="retrain a teacher from its fixed seed",
                             description="Retrain a teacher from its fixed seed (reproduces the shipped weights) "
                                         "and write its model card and grids.")
    ztrain.add_argument("name", help="teacher name (see `fastgen zoo list`)")
    ztrain.add_argument("--out", default=None, help="output folder (default: the installed zoo folder)")
    ztrain.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    ztrain.add_argument("--steps", type=int, default=None, help="denoiser training steps (default: per teacher)")
    ztrain.add_argument("--vae-steps", type=int, default=None, help="VAE training steps, fmnist-ldm only")
    ztrain.add_argument("--batch-size", type=int, default=None, help="batch size (default: 64)")
    ztrain.add_argument("--no-card", action="store_true", help="skip writing the model card and grids")
    zcard = zsub.add_parser("card", help="(re)write a teacher's model card and grids",
                            description="Write README.md and the sample grids of a trained teacher.")
    zcard.add_argument("name", help="teacher name (see `fastgen zoo list`)")
    zcard.add_argument("--out", default=None, help="teacher folder (default: the installed zoo folder)")
    zoo_p.set_defaults(func=_zoo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (KeyError, FileNotFoundError, ValueError, TypeError, NotImplementedError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"fastgen {args.cmd}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
