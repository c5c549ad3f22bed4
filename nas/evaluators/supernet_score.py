"""The weight-shared evaluator: score a candidate's experts as sub-networks of a trained supernet.

The objective is the one the from-scratch proxy reports (``nas.space.proxy_data.heldout_loss``):
the mean over the fixed t grid of eps-MSE on the same held-out images with the same
noise, each t denoised by the expert that owns it. Each grid point's term depends only
on its owner's sub-network, so the evaluator caches one number per (t, sub-network)
and a candidate costs only the terms not seen before; a candidate whose sub-networks
were all seen costs nothing. Cached terms persist in ``<supernet>/scores.jsonl``, keyed
by the held-out protocol and the supernet's weights, so the exact interval-wise
optimiser (``nas.engine.interval_opt``) and later searches reuse them.

With ``proxy.finetune_steps > 0`` every candidate first fine-tunes each expert's
inherited sub-network on its own soft-expert stream (its interval and p_n), the steps
shared out across experts as in from-scratch training (equal compute for every N);
those terms are cached per (sub-network, interval, p_n, steps).
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from meme.common.device import pick_device
from meme.common.errors import ConfigError, UserError
from meme.common.fastpath import fast_path
from meme.model.config import ArchConfig, MemeConfig
from meme.model.diffusion import Diffusion
from meme.model.experts import SoftExpertSampler
from meme.model.supernet import SuperNet, SupernetSpec, arch_key, load_index, load_supernet
from meme.training.compute import train_gflops_per_step
from meme.training.train import draw_batch, train_step, warmup_lr
from nas.evaluators.supernet_training import macro_name, macro_of
from nas.space.proxy import ProxySpec, proxy_config
from nas.space.proxy_data import eval_timesteps, heldout_images, heldout_noise, proxy_dataset
from nas.space.space import load_space

SCORES = "scores.jsonl"


@dataclass
class Score:
    """One candidate's weight-shared score and what it cost."""

    objective: float
    terms: list[dict]                  # per grid t: t, expert, sub-network, loss
    evaluated: int                     # (t, sub-network) terms computed now
    cached: int                        # terms found in the cache
    wall_s: float
    params_proxy: int                  # the experts' sub-networks, at the proxy
    finetune_gflops: float = 0.0       # training compute of the fine-tune (0 without one)
    supernet: dict = field(default_factory=dict)  # path, digest, macro


class SharedScorer:
    """Scores candidates of one space from one supernet directory (one per process; thread-safe)."""

    def __init__(self, supernet_dir: str | Path, proxy: ProxySpec, device: Optional[str] = None):
        self.dir = Path(supernet_dir)
        self.index = load_index(self.dir)
        self.proxy = proxy
        self.device = pick_device(device)
        self.diffusion = Diffusion(proxy.diffusion or _diffusion_of(self.index))
        self.grid = eval_timesteps(self.diffusion.T, proxy.eval_timesteps)
        self.val = heldout_images(proxy)                # the images and noise heldout_loss uses
        self.noise = heldout_noise(self.val, proxy.seed)
        self._train = None
        self._nets: dict[str, SuperNet] = {}
        self._lock = threading.Lock()
        self.protocol = hashlib.sha1(json.dumps(
            {"data": proxy.data, "res": proxy.resolution, "ch": proxy.channels, "eval_batch": proxy.eval_batch,
             "grid": self.grid, "seed": proxy.seed, "precision": proxy.precision,
             "diffusion": str(self.diffusion.cfg)}, sort_keys=True).encode()).hexdigest()[:12]
        self.cache: dict[tuple, float] = {}
        self._param_counts: dict[tuple[str, ArchConfig], int] = {}
        self._specs: dict[str, SupernetSpec] = {}
        self._accepted: dict[tuple[str, ArchConfig], bool] = {}
        self._load_cache()

    # ---- the cache ------------------------------------------------------------
    def _key(self, macro: str, arch: ArchConfig, t: int, tune: tuple = ()) -> tuple:
        return (self.index["macros"][macro]["weights_sha1"], self.protocol, macro, self.name_of(macro, arch),
                int(t), tune)

    def name_of(self, macro: str, arch: ArchConfig) -> str:
        """The sub-network's name in its supernet ('ratios|strides', '@width' when narrower)."""
        return arch_key(arch, int(self.index["macros"][macro]["spec"]["template"]["base_channels"]))

    def _load_cache(self) -> None:
        path = self.dir / SCORES
        if not path.is_file():
            return
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
                self.cache[(r["weights"], r["protocol"], r["macro"], r["arch"], int(r["t"]), tuple(r.get("tune", ())))] = float(r["loss"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a half-written last line from a killed run: that term is recomputed

    def _remember(self, keys_values: list[tuple[tuple, float]]) -> None:
        lines = []
        for k, v in keys_values:
            self.cache[k] = v
            lines.append(json.dumps({"weights": k[0], "protocol": k[1], "macro": k[2], "arch": k[3], "t": k[4],
                                     "tune": list(k[5]), "loss": v}))
        if lines:
            with open(self.dir / SCORES, "a") as f:   # O_APPEND: whole lines from concurrent workers
                f.write("\n".join(lines) + "\n")

    # ---- networks -------------------------------------------------------------
    def macro_for(self, config: MemeConfig, cfg: MemeConfig) -> str:
        """The macro whose supernet runs every expert of ``cfg`` (``config`` at the proxy's scale).

        By name (target base and blocks) when the first expert is full width; experts that are
        narrower widths of a slimmable supernet are matched against each trained spec."""
        name = macro_name(*macro_of(config))
        if name in self.index["macros"] and all(self._accepts(name, a) for a in cfg.experts):
            return name
        for other in self.index["macros"]:
            if all(self._accepts(other, a) for a in cfg.experts):
                return other
        return name     # none runs them all: supernet()/activate() say why

    def _accepts(self, macro: str, arch: ArchConfig) -> bool:
        key = (macro, arch)
        if key not in self._accepted:
            if macro not in self._specs:
                self._specs[macro] = SupernetSpec.from_dict(self.index["macros"][macro]["spec"], f"{self.dir}: {macro}")
            try:
                self._specs[macro].check(arch)
                self._accepted[key] = True
            except ConfigError:
                self._accepted[key] = False
        return self._accepted[key]

    def supernet(self, macro: str) -> SuperNet:
        if macro not in self.index["macros"]:
            raise UserError(f"{self.dir}: no supernet for macro shape {macro} (trained: "
                            f"{sorted(self.index['macros'])}); train it with meme-nas supernet train")
        if macro not in self._nets:
            self._nets[macro] = load_supernet(self.dir, self.index["macros"][macro], self.device)
        return self._nets[macro]

    def _params(self, macro: str, arch: ArchConfig) -> int:
        """A sub-network's parameter count, once per process: a fully cached candidate stays free."""
        key = (macro, arch)
        if key not in self._param_counts:
            self._param_counts[key] = self.supernet(macro).sub_param_count(arch)
        return self._param_counts[key]

    @torch.no_grad()
    def losses(self, net: torch.nn.Module, ts: list[int]) -> list[float]:
        """Held-out eps-MSE of ``net`` at each t (all t in one batched forward)."""
        fp = fast_path(self.device, self.proxy.precision, net)
        x0 = fp.input(self.val.repeat(len(ts), 1, 1, 1), self.device)
        noise = fp.input(self.noise.repeat(len(ts), 1, 1, 1), self.device)
        t = torch.tensor(ts, dtype=torch.long, device=self.device).repeat_interleave(len(self.val))
        with fp.autocast():
            per = self.diffusion.training_loss(net, x0, t, noise, reduction="none")
        return [float(v) for v in per.view(len(ts), len(self.val)).mean(1)]

    def arch_losses(self, macro: str, arch: ArchConfig, ts: list[int]) -> tuple[list[float], int]:
        """Cached per-t losses of one inherited sub-network (proxy-scale arch); (losses, evaluated)."""
        with self._lock:
            keys = [self._key(macro, arch, t) for t in ts]
            missing = [t for t, k in zip(ts, keys) if k not in self.cache]
            if missing:
                net = self.supernet(macro).activate(arch)
                self._remember([(self._key(macro, arch, t), v) for t, v in zip(missing, self.losses(net, missing))])
            return [self.cache[k] for k in keys], len(missing)

    # ---- candidates -----------------------------------------------------------
    def owners(self, cfg: MemeConfig) -> dict[int, list[int]]:
        """Grid t's of each expert (the owner of t)."""
        out: dict[int, list[int]] = {n: [] for n in range(cfg.num_experts)}
        for t in self.grid:
            n = next(i for i, (lo, hi) in enumerate(cfg.intervals()) if lo <= t < hi)
            out[n].append(t)
        return out

    def score(self, config: MemeConfig) -> Score:
        """The candidate's held-out routed loss from inherited (and optionally fine-tuned) experts."""
        t0 = time.perf_counter()
        cfg = proxy_config(config, self.proxy)
        macro = self.macro_for(config, cfg)
        owners = self.owners(cfg)
        terms, evaluated, cached, ft_gflops = [], 0, 0, 0.0
        steps = self._finetune_split(cfg.num_experts)
        for n, arch in enumerate(cfg.experts):
            ts = owners[n]
            if not ts:
                continue
            if steps[n] > 0:
                values, new, gf = self._tuned_losses(macro, cfg, n, ts, steps[n])
                ft_gflops += gf
            else:
                values, new = self.arch_losses(macro, arch, ts)
            evaluated += new
            cached += len(ts) - new
            terms += [{"t": t, "expert": n + 1, "arch": self.name_of(macro, arch), "loss": v}
                      for t, v in zip(ts, values)]
        objective = sum(r["loss"] for r in terms) / len(terms)
        params = sum(self._params(macro, a) for a in cfg.experts)
        entry = self.index["macros"][macro]
        return Score(objective, sorted(terms, key=lambda r: r["t"]), evaluated, cached, time.perf_counter() - t0,
                     params, ft_gflops, {"path": str(self.dir), "digest": self.index.get("digest"), "macro": macro,
                                         "weights_sha1": entry["weights_sha1"]})

    # ---- optional fine-tune ---------------------------------------------------
    def _finetune_split(self, n: int) -> list[int]:
        """Fine-tune steps per expert: proxy.finetune_steps in all, interleaved (expert k mod N)."""
        total = int(getattr(self.proxy, "finetune_steps", 0) or 0)
        return [total // n + (1 if e < total % n else 0) for e in range(n)]

    def _tuned_losses(self, macro: str, cfg: MemeConfig, n: int, ts: list[int], steps: int) -> tuple[list[float], int, float]:
        lo, hi = cfg.intervals()[n]
        p = cfg.resolved_probs()[n]
        tune = (lo, hi, p, steps, self.proxy.seed)
        arch = cfg.experts[n]
        gflops = train_gflops_per_step(cfg, self.proxy.batch_size)[n] * steps
        with self._lock:
            keys = [self._key(macro, arch, t, tune) for t in ts]
            if all(k in self.cache for k in keys):
                return [self.cache[k] for k in keys], 0, gflops
            net = self.supernet(macro).extract(arch)
            fp = fast_path(self.device, self.proxy.precision, net)
            fp.prepare(net, self.device)
            if self._train is None:
                self._train = proxy_dataset(self.proxy.data, self.proxy.shape(), "train", self.proxy.limit_data)
            sampler = SoftExpertSampler(cfg)
            opt = torch.optim.AdamW(net.parameters(), lr=self.proxy.lr, weight_decay=0.0)
            gen = torch.Generator().manual_seed(self.proxy.seed + 1 + 1000 * n)
            net.train()
            for k in range(steps):
                batch = draw_batch(self._train, sampler, n, self.proxy.batch_size, gen, fp, self.device)
                train_step(net, net.parameters(), batch, self.diffusion, opt, fp,
                           warmup_lr(self.proxy.lr, k, self.proxy.warmup), self.proxy.grad_clip)
            net.eval()
            values = self.losses(net, ts)
            self._remember(list(zip(keys, values)))
            return values, len(ts), gflops


def _diffusion_of(index: dict):
    """The space's schedule; a supernet moved to another machine finds its space by file name."""
    src = Path(index["space_source"])
    return load_space(src if src.is_file() else src.stem).diffusion


@lru_cache(maxsize=4)
def scorer_for(supernet_dir: str, proxy: ProxySpec, device: Optional[str]) -> SharedScorer:
    """One scorer per process and supernet (a Ray worker reused across trials keeps its cache)."""
    return SharedScorer(supernet_dir, proxy, device)

