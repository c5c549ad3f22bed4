"""One entry point for every user-facing command: ``meme-nas COMMAND [ARGS...]``.

``meme-nas search --budget-gflops 95`` is ``python -m nas.search --budget-gflops 95``;
each command keeps its own ``--help``. Installed as a console script (setup.cfg).
"""
from __future__ import annotations

import importlib
import sys

from nas import package_version

COMMANDS = {  # name -> (module, one line)
    "search": ("nas.search", "architecture search under a per-step GFLOPs budget"),
    "rerank": ("nas.engine.rerank", "re-train designs on fresh seeds; mean +- std and Welch t-tests"),
    "fidelity": ("nas.studies.fidelity", "rank correlation of the proxy against higher-fidelity training"),
    "dashboard": ("nas.engine.dashboard", "open a study in optuna-dashboard"),
    "export": ("nas.promote.export", "a study's K-th best config as YAML"),
    "promote": ("nas.promote.promote", "train, sample and evaluate a study's top K on the target data"),
    "compare": ("nas.studies.compare", "single vs multi-expert vs hand vs search winner at equal cost (FID, seeds)"),
    "sharing-study": ("nas.studies.shared_parts_study", "shared decoder/encoder and clustered boundaries vs separate experts"),
    "clusters": ("nas.space.clusters", "interval boundaries from clustering timesteps by gradient similarity"),
    "train": ("meme.training.train", "train a MEME (all experts, soft-expert sampling)"),
    "sample": ("meme.sampling.sample", "sample a trained run"),
    "evaluate": ("meme.sampling.evaluate", "FID / precision / recall of a run's samples"),
    "frequency": ("meme.sampling.frequency", "Fourier analysis of feature maps per expert"),
    "macs": ("meme.model.macs", "parameters, MACs and GFLOPs of a config"),
    "autoencoder": ("meme.training.first_stage_cli", "encode images into a latent file; train a small AutoencoderKL"),
    "bench": ("nas.bench.run", "speed, memory and engine-overhead benchmark"),
    "supernet": ("nas.evaluators.supernet_training", "train (or inspect) the weight-shared supernets of a space"),
    "interval-opt": ("nas.engine.interval_opt", "the exact best ratios per interval under a budget, from a supernet"),
    "slimmable": ("nas.studies.slimmable", "width schedules of a slimmable supernet: the best at every budget, and the study"),
    "latency": ("meme.speed.latency", "measured milliseconds of one denoising step of a config"),
    "latency-table": ("nas.space.latency_table", "a space's per-block latency table, and how well it predicts time"),
    "heldout": ("meme.sampling.heldout", "held-out denoising loss of a trained run, per interval of t"),
    "checkpoint": ("meme.common.checkpoint", "convert a checkpoint from the older format to the weights-only one"),
}

def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: meme-nas COMMAND [ARGS...]   (meme-nas COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "  --version   print the version", "  --help      this message"]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(f"meme-nas {package_version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv = [f"meme-nas {name}", *rest]  # argparse names the command in its usage line
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
