"""The ``jharm`` command line.

Each subcommand is one ``_cmd_<name>(subparsers)`` function below that adds
its parser and sets ``handler``; handlers import their module lazily so that
``jharm --help`` stays fast. Config-driven commands take
``--config=configs/x.py[:arg]`` and any number of ``--config.key=value``.
"""
from __future__ import annotations

import argparse
import sys

from jharm.config import ConfigError


def _split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``--config.key=value`` overrides from the other arguments."""
    overrides, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            if "=" not in arg and i + 1 < len(argv):  # --config.key value
                arg = f"{arg}={argv[i + 1]}"
                i += 1
            overrides.append(arg)
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def _cmd_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a task with the sharded engine (resumes from WORKDIR's latest checkpoint)")
    parser.add_argument("--config", required=True, help="configs/x.py[:arg]; then --config.key=value overrides")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tensorboard/, exports")

    def handler(args):
        from jharm import config as config_lib
        from jharm.train import distributed
        from jharm.train.loop import NonFiniteError, train
        from jharm.train.tasks import make_task

        config = config_lib.get(args.config, args.config_overrides)
        # Before make_task: a task factory may already touch devices.
        distributed.initialize(config.distributed)
        try:
            result = train(config, make_task(config), args.workdir)
        except NonFiniteError as err:
            print(f"jharm train: {err}", file=sys.stderr)
            return 3
        if distributed.is_main_process():
            state = "stopped by SIGTERM at" if result.preempted else "finished at"
            print(f"jharm train: {state} step {result.step}; loss {result.metrics.get('loss', float('nan')):.6g}"
                  + (f"; exported {result.export_path}" if result.export_path else ""))
        return 0

    parser.set_defaults(handler=handler)


def _cmd_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write Flax params (e.g. a fine-tuned UNet) as a diffusers/transformers model folder")
    parser.add_argument("--kind", required=True, choices=("unet", "vae", "clip_text"))
    parser.add_argument("--params", required=True,
                        help="params.safetensors written by `jharm train` (a/b/c keys) or a flax .msgpack file")
    parser.add_argument("--base", required=True, help="the model folder the params came from (its config.json)")
    parser.add_argument("--out", required=True, help="output folder (replaced atomically)")

    def handler(args):
        from jharm.weights.diffusers import export_params_file
        from jharm.weights.io import WeightsError

        try:
            path = export_params_file(args.kind, args.params, args.base, args.out)
        except (WeightsError, ValueError) as err:
            print(f"jharm export: {err}", file=sys.stderr)
            return 1
        print(f"jharm export: wrote {path}")
        return 0

    parser.set_defaults(handler=handler)


def _cmd_convert(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert a local transformers/diffusers folder to a Flax params checkpoint")
    parser.add_argument("--src", required=True, help="local model folder (config.json + weights)")
    parser.add_argument("--out", required=True, help="output folder: params.safetensors ('/'-joined Flax paths) + jharm.json")
    parser.add_argument("--kind", required=True, help="clip_text | clip_vision | clip | unet | vae | pipeline")

    def handler(args):
        from jharm.weights.flax_checkpoint import convert_folder
        from jharm.weights.io import WeightsError

        try:
            out, num_params = convert_folder(args.kind, args.src, args.out)
        except (WeightsError, ValueError, FileNotFoundError) as err:
            print(f"jharm convert: {err}", file=sys.stderr)
            return 1
        print(f"jharm convert: {args.kind} with {num_params:,} params -> {out}")
        return 0

    parser.set_defaults(handler=handler)


def _cmd_demo(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the main jobs on the embedded defaults (ShapesWorld)")
    parser.add_argument("names", nargs="*", help="which demos (default: all of jharm.demo.DEFAULT)")
    parser.add_argument("--out", default="runs/demo", help="output folder for reports and image grids")
    parser.add_argument("--seed", type=int, default=0)

    def handler(args):
        from jharm import demo

        try:
            demo.run(args.names or demo.DEFAULT, args.out, args.seed)
        except ValueError as err:
            print(f"jharm demo: {err}", file=sys.stderr)
            return 2
        return 0

    parser.set_defaults(handler=handler)


def _cmd_fair(subparsers) -> None:
    parser = subparsers.add_parser("fair", help="fairness tools: `jharm fair centroids` (LightFair attribute centroids)")
    sub = parser.add_subparsers(dest="fair_command", metavar="FAIR_COMMAND", required=True)
    cent = sub.add_parser("centroids", help="generate attribute images with the original model, embed them with "
                                            "the frozen CLIP image tower, save centroids with provenance")
    cent.add_argument("--config", required=True, help="configs/fair/sd15.py[:attribute]; then --config.key=value")
    cent.add_argument("--out", required=True, help="centroid file (.safetensors)")

    def handler(args):
        from jharm import config as config_lib
        from jharm import fairness

        try:
            config = config_lib.get(args.config, args.config_overrides)
            if "fair" not in config:
                raise ConfigError(f"{args.config} has no `fair` section (see configs/fair/sd15.py)")
            path = fairness.centroids_from_config(config, args.out)
        except (ValueError, OSError) as err:
            print(f"jharm fair centroids: {err}", file=sys.stderr)
            return 2
        print(f"jharm fair centroids: -> {path}")
        return 0

    cent.set_defaults(handler=handler)


def _cmd_shapesworld(subparsers) -> None:
    parser = subparsers.add_parser("shapesworld", help="ShapesWorld models: build (retrain + write assets) | report")
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="retrain judge, tiny CLIP, T2I and IP-Adapter from scratch (seeded)")
    build.add_argument("--out", default=None, help="asset folder (default: the package's shapesworld/assets)")
    build.add_argument("--workdir", default="runs/shapesworld_build", help="checkpoints and logs (use a fresh one)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--stages", nargs="*", default=None, help="judge clip t2i ip_adapter (default: all)")
    build.add_argument("--no-report", action="store_true", help="skip measuring the gates after training")
    build.add_argument("--host-devices", type=int, default=None,
                       help="on CPU, train data parallel over this many XLA host devices (default: 2 where "
                            "the machine has 2 or more cores; 1 = one device); accelerators are unaffected")
    rep = sub.add_parser("report", help="measure the quality gates on an asset folder and print them")
    rep.add_argument("--assets", default=None, help="asset folder (default: the shipped one)")
    rep.add_argument("--samples-per-prompt", type=int, default=2, help="T2I samples per colour-shape prompt")
    rep.add_argument("--samples-per-synonym", type=int, default=1)
    rep.add_argument("--samples-neutral", type=int, default=32, help="samples per neutral prompt of a biased shape")
    rep.add_argument("--ip-samples", type=int, default=32)
    rep.add_argument("--write", action="store_true", help="store the metrics in the folder's manifest")

    def handler(args):
        from jharm.runtime import set_host_devices
        from jharm.shapesworld import assets, build as build_lib, report as report_lib

        try:
            if args.action == "build":
                host_devices = build_lib.default_host_devices() if args.host_devices is None else args.host_devices
                set_host_devices(host_devices)  # before the first JAX computation
                build_lib.build(args.out, seed=args.seed, workdir=args.workdir,
                                stages=tuple(args.stages or build_lib.STAGES), report=not args.no_report)
            else:
                report_lib.report(args.assets, write=args.write, per_prompt=args.samples_per_prompt,
                                  per_synonym=args.samples_per_synonym, per_neutral=args.samples_neutral,
                                  ip_samples=args.ip_samples)
        except (assets.AssetError, ValueError) as err:
            print(f"jharm shapesworld {args.action}: {err}", file=sys.stderr)
            return 1
        except build_lib.BuildStopped as err:
            print(f"jharm shapesworld build: {err}", file=sys.stderr)
            return 143  # 128 + SIGTERM: schedulers read it as "pre-empted, run again"
        return 0

    parser.set_defaults(handler=handler)


def _generation_args(parser) -> None:
    parser.add_argument("--model", required=True, help="local diffusers SD folder (unet/ vae/ text_encoder/ ...)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)


def _cmd_eval(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="generate one image per row of a prompt CSV, detect nudity, "
                                                "write results.jsonl + summary.md")
    _generation_args(parser)
    parser.add_argument("--prompts", required=True, help="CSV with columns prompt, evaluation_seed (others kept)")
    parser.add_argument("--out", required=True, help="output folder (images/, results.jsonl, summary.md)")
    parser.add_argument("--unet", default="", help="erased UNet folder (diffusers) replacing the model's UNet")
    parser.add_argument("--sld", default="", help="SLD preset: weak | medium | strong | max")
    parser.add_argument("--safety-concept", default=None, help="SLD safety concept (default: SLD's)")
    parser.add_argument("--ip-adapter", default="", help="IP-Adapter file (Co-Erasing+SLD)")
    parser.add_argument("--concept-images", default="", help="concept image folder: Co-Erasing+SLD")
    parser.add_argument("--concept", default="nudity", help="concept text refining the image tokens")
    parser.add_argument("--detector", default="nudenet", choices=("nudenet", "none"))

    def handler(args):
        from jharm import erase

        try:
            summary = erase.evaluate(
                args.model, args.prompts, args.out, unet=args.unet, steps=args.steps,
                guidance_scale=args.guidance_scale, sld=args.sld,
                safety_concept=erase.SLD_SAFETY_CONCEPT if args.safety_concept is None else args.safety_concept,
                ip_adapter=args.ip_adapter, concept_images=args.concept_images, concept=args.concept,
                resolution=args.resolution, batch_size=args.batch_size, detector=args.detector)
        except (ValueError, OSError) as err:
            print(f"jharm eval: {err}", file=sys.stderr)
            return 2
        print(f"jharm eval: {summary['num_images']} images -> {args.out}/summary.md")
        return 0

    parser.set_defaults(handler=handler)


def _cmd_sample(subparsers) -> None:
    parser = subparsers.add_parser("sample", help="seeded concept images ('a photo of {c}') for Co-Erasing")
    _generation_args(parser)
    parser.add_argument("--concept", required=True)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--template", default="a photo of {c}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder of PNGs")

    def handler(args):
        from jharm import erase

        try:
            out = erase.generate_concept_images(args.model, args.concept, args.n, args.out, seed=args.seed,
                                                template=args.template, steps=args.steps,
                                                guidance_scale=args.guidance_scale, resolution=args.resolution,
                                                batch_size=args.batch_size)
        except (ValueError, OSError) as err:
            print(f"jharm sample: {err}", file=sys.stderr)
            return 2
        print(f"jharm sample: {args.n} images -> {out}")
        return 0

    parser.set_defaults(handler=handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jharm",
        description="Harmless generation in JAX/Flax: concept erasure, fairness and bridge-backdoor analysis.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, value in sorted(globals().items()):
        if name.startswith("_cmd_"):
            value(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from jharm.runtime import configure_xla_cpu

    configure_xla_cpu()  # before any handler starts JAX
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = _split_config_overrides(argv)
    parser = build_parser()
    args = parser.parse_args(rest)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    args.config_overrides = overrides
    if overrides and not hasattr(args, "config"):
        parser.error(f"'jharm {args.command}' takes no --config overrides (got {overrides[0]})")
    try:
        return int(args.handler(args) or 0)
    except ConfigError as err:
        print(f"jharm {args.command}: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
