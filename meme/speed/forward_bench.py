"""Network forward benchmarks: what each numeric path and the iFormer blocks cost one forward.

Two sections of ``python -m nas.bench`` (sizes and shared helpers from ``meme.speed.model_bench``):

* **fastpath** -- one network forward of an iU-Net expert and of LDM-L under each
  numeric path (fp32, channels_last, bf16 autocast, both, and compiled with
  ``--compile``): speed-up over fp32 eager, relative error against it, and how much of
  the MACs ratio between the two models each path realises.
* **iformer** -- the iFormer blocks' share of a Table 4 expert's time against their
  share of its MACs, fast mixer and reference one, and the expert against LDM-L; the
  same at the sampling batch with the blocks timed by difference (the expert with and
  without them), which says how much of the speed ratio to LDM-L they cost and what
  they would have to cost for 3.2x; and each stage's mixer alone, fast against
  reference, per precision and batch.
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from meme.common.fastpath import FastPath, compile_for_inference, cpu_has_fast_bf16, fast_path
from meme.model.blocks import IFormerBlock, reference_mixers
from meme.model.config import MemeConfig
from meme.model.macs import cost_of_meme
from meme.model.experts import build_network, wake_zero_init
from meme.model.references import resolve
from meme.speed.bench_report import Row
from meme.speed.model_bench import REFERENCE, BenchOptions, at_resolution, gmacs_mean, shape_label
from meme.speed.timing import cold_compile, median, time_runs

FAST_PATH_MODELS = ("iu-ldm-s", "ldm-l")     # one iU-Net expert and the reference, network forward only
Model = tuple[str, MemeConfig, int]          # (item, config at its bench shape, batch)


def fast_path_models(o: BenchOptions, extra: Iterable[Model] = ()) -> list[Model]:
    """The two models at the bench's shape, then any extra ones (e.g. a search proxy) at their own."""
    return [(name, at_resolution(resolve(name), o.resolution), o.batch) for name in FAST_PATH_MODELS] + list(extra)


@dataclass(frozen=True)
class Variant:
    """One numeric path of a network forward, timed against plain fp32 eager."""

    name: str
    channels_last: bool
    bf16: bool
    compiled: bool = False


def fast_path_variants(compile: bool, bf16: bool = True) -> tuple[Variant, ...]:
    """The paths timed; without native bf16 (``bf16=False``) the bf16 ones are left out, and
    the compiled one is the fp32 channels_last path that ``fast_path`` picks there."""
    out = (Variant("fp32", False, False), Variant("channels_last", True, False))
    if bf16:
        out += (Variant("bf16", False, True), Variant("bf16+channels_last", True, True))
    tag = "bf16+channels_last+compile" if bf16 else "channels_last+compile"
    return out + ((Variant(tag, True, bf16, compiled=True),) if compile else ())


NO_NATIVE_BF16 = "not measured: no native bf16 on this CPU (fast_path never picks it here; emulated, it times the emulation)"


def bench_fast_paths(o: BenchOptions, dev: torch.device, log: Callable[[str], None],
                     extra: Iterable[Model] = ()) -> list[Row]:
    """What each fast path buys one denoiser forward, and whether the MACs ratio survives it.

    Every variant runs the same woken network (zero-init convs given random weights,
    so every layer shapes the output) on the same batch; speed-ups and the relative
    L2 error are against fp32 eager of that model, measured in this run.
    """
    native_bf16 = dev.type == "cuda" or cpu_has_fast_bf16()
    variants = fast_path_variants(o.compile, native_bf16)
    skipped = [v for v in fast_path_variants(False) if v not in variants]
    times: dict[tuple[str, str], float] = {}
    rows: list[Row] = []
    macs: dict[str, float] = {}
    for name, cfg, b in fast_path_models(o, extra):
        macs[name] = gmacs_mean(cfg)
        label = shape_label(cfg, b)
        torch.manual_seed(0)
        net = wake_zero_init(build_network(cfg.experts[0], cfg.data)).eval()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(b, cfg.data.channels, cfg.data.resolution, cfg.data.resolution, generator=g)
        t = torch.randint(0, cfg.diffusion.timesteps, (b,), generator=g).to(dev)
        ref = None
        for v in variants:
            if v.compiled and name not in FAST_PATH_MODELS:
                continue    # extra models are search proxies: a trial never compiles, each would pay it anew
            fp = FastPath(dev.type, bf16=v.bf16, channels_last=v.channels_last)
            fp.prepare(net, dev)
            xv = fp.input(x, dev)
            run = compile_for_inference(net) if v.compiled else net

            def forward():
                return run(xv, t)

            compile_s = None
            # one autocast region over all runs, as the sampler holds one per run of steps:
            # the weights' bf16 copies are made once (in the warm-up), not per forward
            with torch.no_grad(), fp.autocast():
                if v.compiled:
                    with cold_compile():
                        compile_s = time_runs(forward, dev, 1, 0)[0]
                s = median(time_runs(forward, dev, o.repeats, o.warmup))
                y = forward().float().cpu()
            if ref is None:
                ref = y
            err = float((y - ref).norm() / ref.norm())
            times[(name, v.name)] = s
            base = times[(name, variants[0].name)]
            log(f"  fast path {name:<9} {v.name:<26} {1e3 * s:8.1f} ms  x{base / s:.2f}  rel.err {err:.1e}")
            rows.append(Row("fastpath", name, f"ms_{v.name}", 1e3 * s, "ms", base / s, "", "", label,
                            f"one forward, no_grad; vs_ref = fp32 eager / this; rel. L2 error vs fp32 {err:.1e}"))
            if compile_s is not None:
                rows.append(Row("fastpath", name, "compile_time", compile_s - s, "s", shape=label,
                                note="first compiled forward minus a steady one (inductor, frozen weights, cold caches)"))
        rows += [Row("fastpath", name, f"ms_{v.name}", NO_NATIVE_BF16, "ms", shape=label) for v in skipped]
        del net
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    iu, ref_name = FAST_PATH_MODELS
    label = shape_label(at_resolution(resolve(ref_name), o.resolution), o.batch)
    for v in variants:
        rows.append(Row("fastpath", f"{iu}/{ref_name}", f"speed_ratio_{v.name}",
                        times[(ref_name, v.name)] / times[(iu, v.name)], "x", "", macs[ref_name] / macs[iu],
                        "", label, "how much of the MACs ratio this path realises"))
    rows += [Row("fastpath", f"{iu}/{ref_name}", f"speed_ratio_{v.name}", NO_NATIVE_BF16, "x", shape=label)
             for v in skipped]
    return rows


def iformer_macs_share(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    """Fraction of a forward's matmul/conv MACs inside IFormerBlocks (attention counted: SDPA math)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), reference_mixers(), FlopCounterMode(display=False) as fc:
        net(x, t)
    counts = fc.get_flop_counts()
    root = type(net).__name__
    inside = sum(sum(counts.get(f"{root}.{n}", {}).values()) for n, m in net.named_modules()
                 if isinstance(m, IFormerBlock))
    return inside / fc.get_total_flops()


def bench_iformer(o: BenchOptions, dev: torch.device, log: Callable[[str], None]) -> list[Row]:
    """iFormer blocks' share of a Table 4 expert's time against their share of its MACs, for the
    fast mixer (``InceptionMixer.fast_forward``) and the reference one, and the expert's
    forward against LDM-L's, at batch 1 on the default fast path.

    The variants are interleaved: each round times every one once, so a change in the
    machine's load reaches all of them alike; medians over the rounds.
    """
    t4 = at_resolution(resolve("meme-table4"), o.resolution)
    ref_cfg = at_resolution(resolve(REFERENCE), o.resolution)
    torch.manual_seed(0)
    nets = {"meme-table4 expert 1": wake_zero_init(build_network(t4.experts[0], t4.data)).eval(),
            REFERENCE: wake_zero_init(build_network(ref_cfg.experts[0], ref_cfg.data)).eval()}
    x = torch.randn(1, t4.data.channels, t4.data.resolution, t4.data.resolution)
    t = torch.full((1,), 500, dtype=torch.long)
    share_macs = iformer_macs_share(nets["meme-table4 expert 1"], x, t)
    # one torch thread on a CPU: the thread's CPU time, which leaves out waits a loaded machine imposes
    cpu_clock = dev.type == "cpu" and torch.get_num_threads() == 1
    clock = time.thread_time if cpu_clock else time.perf_counter
    inside = [0.0]
    starts: dict[int, float] = {}
    e = "meme-table4 expert 1"
    expert = nets[e]
    paths = {name: fast_path(dev, "auto", net) for name, net in nets.items()}
    for name, net in nets.items():
        paths[name].prepare(net, dev)
    xs = {name: paths[name].input(x, dev) for name in nets}
    variants = [("fast", e), ("reference", e), ("fast", REFERENCE)]
    runners = {("fast", e): expert, ("reference", e): expert, ("fast", REFERENCE): nets[REFERENCE]}
    compile_s = None
    if o.compile and not o.quick:
        # the same expert, fast mixer, compiled whole (its own copy: hooks stay out of its graph)
        runners[("compiled", e)] = compile_for_inference(copy.deepcopy(expert))
        variants.append(("compiled", e))
        with cold_compile(), torch.no_grad(), paths[e].autocast():
            t0 = time.perf_counter()
            runners[("compiled", e)](xs[e], t.to(dev))
            compile_s = time.perf_counter() - t0
        log(f"  iformer compiled: first call {compile_s:.1f} s")
    for m in expert.modules():
        if isinstance(m, IFormerBlock):
            m.register_forward_pre_hook(lambda mod, args: starts.__setitem__(id(mod), clock()))
            m.register_forward_hook(lambda mod, args, out: inside.__setitem__(0, inside[0] + clock() - starts[id(mod)]))
    times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    shares: dict[str, list[float]] = {"fast": [], "reference": []}
    # an outer autocast region keeps the weights' bf16 copies across the rounds' inner
    # regions (autocast clears its cache only when the outermost one exits), as the
    # sampler casts them once per run of steps
    outer = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=any(p.bf16 for p in paths.values()))
    with outer:
        for r in range(o.warmup + o.repeats):
            for mixer, name in variants:
                inside[0] = 0.0
                ctx = reference_mixers() if mixer == "reference" else contextlib.nullcontext()
                run = runners[(mixer, name)]
                with ctx, torch.no_grad(), paths[name].autocast():
                    s = time_runs(lambda: run(xs[name], t.to(dev)), dev, 1, 0, cpu_clock=cpu_clock)[0]
                if r >= o.warmup:
                    times[(mixer, name)].append(s)
                    if name != REFERENCE and mixer in shares:
                        shares[mixer].append(inside[0] / s)
    ms = {v: 1e3 * median(times[v]) for v in variants}
    share = {k: median(v) for k, v in shares.items()}
    gm_t4, gm_ref = cost_of_meme(t4).experts[0].gmacs, gmacs_mean(ref_cfg)
    label = shape_label(t4, 1)
    prec = paths["meme-table4 expert 1"].describe()
    for mixer in ("fast", "reference"):
        log(f"  iformer {mixer:<9}: expert {ms[(mixer, 'meme-table4 expert 1')]:.1f} ms, iFormer time share "
            f"{100 * share[mixer]:.0f}% vs MACs share {100 * share_macs:.0f}%")
    compiled = [] if compile_s is None else [
        Row("iformer", e, "ms_compiled", ms[("compiled", e)], "ms", ms[("fast", e)] / ms[("compiled", e)], "",
            "> 1 (beats eager)", label, "compile_for_inference of the fast-mixer expert; vs_ref = eager fast mixer / "
                                        "compiled, interleaved rounds"),
        Row("iformer", e, "compile_time", compile_s, "s", shape=label, note="first compiled call, cold caches"),
    ]   # no compiled LDM-L ratio here: LDM-L compiled is the compile section's (sampling, both compiled)
    return compiled + [
        Row("iformer", e, "ms_fast_mixer", ms[("fast", e)], "ms", ms[("reference", e)] / ms[("fast", e)],
            shape=label, note=f"one forward, {prec}; vs_ref = reference mixer / fast mixer, interleaved rounds; "
                              f"{'thread CPU time (1 thread)' if cpu_clock else 'wall'} clock"),
        Row("iformer", e, "ms_reference_mixer", ms[("reference", e)], "ms", shape=label,
            note="InceptionMixer.reference_forward (meme.model.blocks.reference_mixers)"),
        Row("iformer", e, "macs_share", 100 * share_macs, "%", shape=label,
            note="IFormerBlocks' matmul/conv MACs over the network's (attention included)"),
        Row("iformer", e, "time_share_fast", 100 * share[("fast")], "%", share["fast"] / share_macs, "",
            "<= 1.5x the MACs share", label, "vs_ref = time share / MACs share; forward hooks on every IFormerBlock"),
        Row("iformer", e, "time_share_reference", 100 * share["reference"], "%", share["reference"] / share_macs,
            shape=label, note="vs_ref = time share / MACs share, reference mixer"),
        Row("iformer", f"{e}/{REFERENCE}", "speed_ratio_fast", ms[("fast", REFERENCE)] / ms[("fast", e)], "x", "",
            gm_ref / gm_t4, "", label, "LDM-L ms / expert ms, both on their default fast path, batch 1"),
        Row("iformer", f"{e}/{REFERENCE}", "speed_ratio_reference", ms[("fast", REFERENCE)] / ms[("reference", e)],
            "x", "", gm_ref / gm_t4, "", label, "the same with the reference mixer"),
    ]


class PassThrough(torch.nn.Module):
    """Stands in for a block left out of a network: ``(x, emb) -> x``."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return x


def without_iformer_blocks(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``net`` with every IFormerBlock replaced by ``PassThrough``: the rest of it, to time."""
    rest = copy.deepcopy(net)
    for name, m in net.named_modules():
        if isinstance(m, IFormerBlock):
            rest.set_submodule(name, PassThrough())
    return rest


RATIO_TARGET = 3.2      # meme-table4 / LDM-L sampling speed (issue: time, not MACs)


def bench_iformer_budget(o: BenchOptions, dev: torch.device, log: Callable[[str], None]) -> list[Row]:
    """Where the meme-table4 / LDM-L speed ratio is lost, at the sampling batch.

    Three forwards, interleaved in rounds inside one autocast region (the sampler's steady
    state, weights cast once): a Table 4 expert, the same expert with its iFormer blocks
    left out (``without_iformer_blocks``), and LDM-L. The blocks cost the difference of
    the first two; the rest's MACs per second are set against LDM-L's; and the blocks'
    time that would give ``RATIO_TARGET`` is LDM-L's time / target minus the rest's.
    Removing the blocks leaves the rest's work unchanged: every block maps d channels
    to d channels at the same resolution.
    """
    t4 = at_resolution(resolve("meme-table4"), o.resolution)
    ref_cfg = at_resolution(resolve(REFERENCE), o.resolution)
    e = "meme-table4 expert 1"
    torch.manual_seed(0)
    expert = wake_zero_init(build_network(t4.experts[0], t4.data)).eval()
    reference = wake_zero_init(build_network(ref_cfg.experts[0], ref_cfg.data)).eval()
    x1 = torch.randn(1, t4.data.channels, t4.data.resolution, t4.data.resolution)
    share_macs = iformer_macs_share(expert, x1, torch.full((1,), 500, dtype=torch.long))
    nets = {"expert": expert, "rest": without_iformer_blocks(expert), REFERENCE: reference}
    fp = fast_path(dev, "auto", expert)
    for net in nets.values():
        fp.prepare(net, dev)
    b = o.batch
    x = fp.input(torch.randn(b, t4.data.channels, t4.data.resolution, t4.data.resolution), dev)
    t = torch.full((b,), 500, dtype=torch.long, device=dev)
    times: dict[str, list[float]] = {k: [] for k in nets}
    with torch.no_grad(), fp.autocast():
        for r in range(o.warmup + o.repeats):
            for k, net in nets.items():
                s = time_runs(lambda: net(x, t), dev, 1, 0)[0]
                if r >= o.warmup:
                    times[k].append(s)
    ms = {k: 1e3 * median(v) for k, v in times.items()}
    blocks_ms = ms["expert"] - ms["rest"]
    share_time = blocks_ms / ms["expert"]
    gm_t4, gm_ref = cost_of_meme(t4).experts[0].gmacs, gmacs_mean(ref_cfg)
    rest_rate = gm_t4 * (1 - share_macs) / ms["rest"]
    rate_ratio = rest_rate / (gm_ref / ms[REFERENCE])
    budget = ms[REFERENCE] / RATIO_TARGET - ms["rest"]
    log(f"  iformer b{b}: expert {ms['expert']:.1f} ms, without its iFormer blocks {ms['rest']:.1f} ms, "
        f"{REFERENCE} {ms[REFERENCE]:.1f} ms; blocks {blocks_ms:.1f} ms ({100 * share_time:.0f}% of the time, "
        f"{100 * share_macs:.0f}% of the MACs); the rest at {rate_ratio:.2f}x {REFERENCE}'s MAC rate; "
        f"{RATIO_TARGET}x needs the blocks at {budget:.1f} ms")
    label = shape_label(t4, b)
    how = f"{fp.describe()}, weights cast once (one autocast region), interleaved rounds"
    return [
        Row("iformer", e, f"ms_b{b}", ms["expert"], "ms", shape=label, note=f"one forward, {how}"),
        Row("iformer", e, f"ms_b{b}_without_iformer_blocks", ms["rest"], "ms", shape=label,
            note="every IFormerBlock replaced by a pass-through (d -> d at the same resolution)"),
        Row("iformer", e, f"iformer_blocks_ms_b{b}", blocks_ms, "ms", share_time / share_macs, "",
            "<= 1.5x the MACs share", label,
            f"the difference of the two rows above: {100 * share_time:.0f}% of the time for "
            f"{100 * share_macs:.0f}% of the MACs; vs_ref = time share / MACs share"),
        Row("iformer", f"{e} without iFormer blocks/{REFERENCE}", f"macs_rate_ratio_b{b}", rate_ratio, "x",
            shape=label, note="GMACs per second of the rest of the expert over LDM-L's: 1 = as efficient"),
        Row("iformer", e, f"iformer_blocks_ms_b{b}_for_{RATIO_TARGET}x", budget, "ms", blocks_ms / budget, shape=label,
            note=f"{REFERENCE} ms / {RATIO_TARGET} minus the rest's ms: what the blocks may cost for that ratio "
                 f"per forward; vs_ref = their time now / this"),
        Row("iformer", f"{e}/{REFERENCE}", f"speed_ratio_b{b}", ms[REFERENCE] / ms["expert"], "x", "",
            gm_ref / gm_t4, "", label, f"one forward each, {how}"),
    ]


def stage_mixers(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """The first IFormerBlock mixer of each resolution, with the input it receives in a forward."""
    seen: dict[tuple, tuple[torch.nn.Module, torch.Tensor]] = {}
    hooks = []
    for m in net.modules():
        if isinstance(m, IFormerBlock):
            def grab(mod, args):
                key = tuple(args[0].shape[1:])
                if key not in seen:
                    seen[key] = (mod, args[0].detach().clone())
            hooks.append(m.mixer.register_forward_pre_hook(grab))
    try:
        with torch.no_grad():
            net(x, t)
    finally:
        for h in hooks:
            h.remove()
    return list(seen.values())


def bench_mixers(o: BenchOptions, dev: torch.device, log: Callable[[str], None]) -> list[Row]:
    """Each stage's iFormer mixer of a Table 4 expert alone, fast against reference forward, at
    batch 1 and the bench batch, in fp32 and (where native) bf16, interleaved round by round.

    Whether the fast mixer pays depends on the machine and the precision (fewer passes,
    but a grouped 1x1 conv and a depthwise conv over twice the channels): these rows
    show it per stage, on the machine at hand.
    """
    t4 = at_resolution(resolve("meme-table4"), o.resolution)
    torch.manual_seed(0)
    net = wake_zero_init(build_network(t4.experts[0], t4.data)).eval()
    x = torch.randn(1, t4.data.channels, t4.data.resolution, t4.data.resolution)
    mixers = stage_mixers(net, x, torch.full((1,), 500, dtype=torch.long))
    precisions = [False] + ([True] if dev.type == "cuda" or cpu_has_fast_bf16() else [])
    cpu_clock = dev.type == "cpu" and torch.get_num_threads() == 1
    rows = []
    for mixer, inp in mixers:
        d, res = inp.shape[1], inp.shape[-1]
        item = f"meme-table4 expert 1 mixer {d}x{res}x{res} d_h {mixer.d_h} pool {mixer.low.stride}"
        for bf16 in precisions:
            fp = FastPath(dev.type, bf16=bf16, channels_last=True)
            fp.prepare(mixer, dev)
            for b in sorted({1, o.batch}):
                xb = fp.input(inp.expand(b, -1, -1, -1).contiguous(), dev)
                times = {"fast": [], "reference": []}
                with torch.no_grad(), fp.autocast():    # weights cast once, as in the sampler
                    for r in range(o.warmup + o.repeats):
                        for kind, fn in (("fast", mixer.fast_forward), ("reference", mixer.reference_forward)):
                            s = time_runs(lambda: fn(xb), dev, 1, 0, cpu_clock=cpu_clock)[0]
                            if r >= o.warmup:
                                times[kind].append(s)
                fast, ref = (1e3 * median(times[k]) for k in ("fast", "reference"))
                prec = "bf16" if bf16 else "fp32"
                log(f"  mixer {d}x{res}x{res} d_h {mixer.d_h:<3} b{b:<3} {prec}: fast {fast:.2f} ms, "
                    f"reference {ref:.2f} ms, x{ref / fast:.2f}")
                rows.append(Row("iformer", item, f"ms_fast_mixer_{prec}_b{b}", fast, "ms", ref / fast, shape=f"b{b}",
                                note=f"{fp.describe()}; vs_ref = reference {ref:.3g} ms / fast, interleaved rounds"))
    return rows
