"""One ``meme.training.train`` run across K Ray Train workers (``nas.promote.promote --workers-per-run K``).

Ray Train's ``TorchTrainer`` starts K workers over the cluster and joins them in one
torch process group (gloo, or NCCL with GPUs); each worker then runs ``meme.training.train``'s
own command line in-process, and ``meme.training.distributed`` takes the group as it finds it:
the same data-parallel (or ``--expert-parallel``) training as under torchrun, rank 0
writing the run's checkpoints into its folder. That folder must be on a file system
every node sees.

When a worker dies, ``FailureConfig(max_failures)`` restarts all K, and every start
passes ``--resume``: the run continues from its last checkpoint, not from step 0.
Ray Train's own checkpoints are not used; the run folder's ``last.pt`` is the one
checkpoint, the one ``meme.sampling.sample`` reads.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from meme.common.errors import UserError


@dataclass(frozen=True)
class RayWorkers:
    """The Ray Train workers of one run."""

    workers: int = 2
    cpus: float = 1.0          # per worker
    gpus: float = 0.0          # per worker (NCCL when > 0)
    max_failures: int = 2      # worker failures the run survives, each resuming from its checkpoint


def _worker(config: dict[str, Any]) -> None:
    from meme.training.train import main  # in the worker process, after Ray Train joined the group

    with open(config["log"], "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        rc = main(config["argv"])
    if rc != 0:
        raise RuntimeError(f"meme.training.train exited with {rc} on this worker (see the run's log)")


def train_on_workers(argv: Sequence[str], place: RayWorkers, run: Path, log: Path) -> None:
    """``meme-nas train ARGV --resume`` on ``place.workers`` Ray Train workers, output appended
    to ``log``; blocks until done."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if place.workers < 1 or place.max_failures < 0:
        raise UserError(f"--workers-per-run must be >= 1, got {place.workers}")
    resources = {"CPU": place.cpus, **({"GPU": place.gpus} if place.gpus else {})}
    trainer = TorchTrainer(
        _worker, train_loop_config={"argv": [*argv, "--resume"], "log": str(Path(log).resolve())},
        torch_config=TorchConfig(backend="nccl" if place.gpus else "gloo"),
        scaling_config=ScalingConfig(num_workers=place.workers, use_gpu=place.gpus > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name="ray-train", storage_path=str(Path(run).resolve()),
                             failure_config=FailureConfig(max_failures=place.max_failures)))
    try:
        trainer.fit()
    except Exception as exc:   # TrainingFailedError and friends: one line naming the run
        lines = str(exc).strip().splitlines()
        raise UserError(f"{run}: training on {place.workers} Ray Train workers failed: "
                        f"{lines[-1] if lines else type(exc).__name__}") from None
