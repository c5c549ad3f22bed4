"""What a training run is asked for, apart from the model: :class:`TrainOptions`, and its flags.

One dataclass is the run's record (``options.json``), the ``meme.training.train`` command line
(one flag per field, help text from the field) and what other programs build to start a
run (``nas.promote.promote``: ``to_argv``), so a flag's name and meaning live only here.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from meme.common.errors import UserError
from meme.training.branching import SPLIT_OPTIMIZERS, BranchPlan, split_step


def _opt(default: Any, help: str, choices: Optional[tuple] = None) -> Any:
    """A TrainOptions field whose help (and choices) the CLI flag reuses."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainOptions:
    """Everything about a run that is not the model itself (saved beside the checkpoints)."""

    data: Optional[str] = _opt(None, "dataset spec for meme.data.dataset.load_data (None = Fashion-MNIST)")
    steps: int = _opt(20_000, "total optimizer steps over all experts")
    batch_size: int = _opt(64, "images per step (under torchrun: the global batch, split over the ranks)")
    lr: float = _opt(2e-4, "AdamW peak learning rate")
    warmup: int = _opt(500, "linear warm-up steps")
    weight_decay: float = _opt(0.0, "AdamW decoupled weight decay")
    ema_decay: float = _opt(0.999, "EMA decay (warmed up as min(decay, (1+n)/(10+n)))")
    grad_clip: float = _opt(1.0, "max global grad norm (0 = off)")
    schedule: str = _opt("interleaved", "expert training order: interleaved, sequential (the paper's) or weighted "
                                        "(each expert's share of steps = its interval's share of t)",
                         ("interleaved", "sequential", "weighted"))
    seed: int = _opt(0, "model init, data order, timesteps and noise")
    ckpt_every: int = _opt(1000, "steps between checkpoints")
    sample_every: int = _opt(2000, "steps between sample grids (0 = off)")
    sample_steps: int = _opt(50, "DDIM steps for the grids")
    log_every: int = _opt(50, "steps between CSV rows / bar updates")
    check_every: int = _opt(0, "steps between the host's looks at the loss for NaN/inf (0 = auto: every step on a "
                               "CPU or under torchrun, every --log-every steps on one GPU); a NaN model is never "
                               "checkpointed")
    limit_data: Optional[int] = _opt(None, "use only the first N training images")
    device: str = _opt("auto", "'auto', 'cpu', 'cuda', 'cuda:1'...")
    precision: str = _opt("auto", "auto (meme.common.fastpath decides), bf16 or fp32", ("auto", "bf16", "fp32"))
    threads: Optional[int] = _opt(None, "CPU threads (default: torch's); set it when sharing the cores")
    compile: bool = _opt(False, "torch.compile each expert's training forward (pays on long runs)")
    branch_at: float = _opt(0.0, "fraction of --steps trained as one shared parent on all t before it splits "
                                 "into the experts (0 = experts from the start)")
    split_optimizer: str = _opt("carry", "at the split: carry the parent's AdamW moments, or a fresh optimizer "
                                         "and warm-up", SPLIT_OPTIMIZERS)
    snapshot_at: Optional[str] = _opt(None, "also keep checkpoints/stepNNNNNNN.pt at these steps (e.g. 250,1000): "
                                            "an interleaved run's prefix is a shorter run, so one run scores "
                                            "several budgets")
    init_from: Optional[str] = _opt(None, "experts' initial weights: a trained supernet directory, or a run of "
                                          "one network of the experts' architecture")
    expert_parallel: bool = _opt(False, "under torchrun: split the ranks into groups that train different experts "
                                        "at once, each expert on its own data stream (meme.training.distributed)")

    def snapshot_steps(self) -> set[int]:
        try:
            steps = {int(x) for x in str(self.snapshot_at).split(",") if x.strip()} if self.snapshot_at else set()
        except ValueError:
            raise UserError(f"--snapshot-at must be comma-separated steps, got {self.snapshot_at!r}") from None
        if any(not 1 <= s <= self.steps for s in steps):
            raise UserError(f"--snapshot-at: every step must lie in [1, --steps={self.steps}], got {sorted(steps)}")
        return steps

    def branch_plan(self) -> BranchPlan:
        return BranchPlan(at=split_step(self.branch_at, self.steps), optimizer=self.split_optimizer,
                          source=self.init_from).validate(self.steps)


_HINTS = typing.get_type_hints(TrainOptions)   # annotations are strings under ``from __future__``


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _kind(f: dataclasses.Field) -> type:
    """The field's value type for argparse: its annotation, Optional unwrapped (str for anything else)."""
    hint = _HINTS[f.name]
    inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return inner[0] if inner[0] in (int, float, bool) else str


def add_option_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainOptions field, with its default and help."""
    defaults = TrainOptions()
    for f in dataclasses.fields(TrainOptions):
        kind, help_text, choices = _kind(f), f.metadata["help"], f.metadata["choices"]
        if kind is bool:
            p.add_argument(flag(f.name), action="store_true", help=f"{help_text} (off by default)")
            continue
        p.add_argument(flag(f.name), type=kind, default=getattr(defaults, f.name), choices=choices,
                       help=f"{help_text} (default %(default)s)")


def options_from(args: argparse.Namespace) -> TrainOptions:
    return TrainOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)})


def to_argv(opts: TrainOptions) -> list[str]:
    """The ``meme.training.train`` flags that give ``opts`` (fields at their default are left out)."""
    defaults, argv = TrainOptions(), []
    for f in dataclasses.fields(TrainOptions):
        value = getattr(opts, f.name)
        if value == getattr(defaults, f.name):
            continue
        if _kind(f) is bool:
            argv.append(flag(f.name))   # store_true: a default-False flag is on when present
        else:
            argv += [flag(f.name), str(value)]
    return argv
