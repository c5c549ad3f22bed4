"""Fuzzing the loaders: whatever the bytes, a result or one refusal line, never a traceback.

Property-based (hypothesis) over YAML configs and search spaces, and mutation fuzzing
(bit flips, truncation, deleted keys, wrong dtypes, lying shapes) over real training
checkpoints and latent files. Every run is derandomized and bounded in examples, so
CI sees the same cases every time; ``@example`` cases are inputs that once failed.
"""
from __future__ import annotations

import copy
import itertools
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meme.common import checkpoint
from meme.common.command import EXPECTED_ERRORS
from meme.data.dataset import load_data
from meme.data.latents import LatentInfo, latent_info
from meme.model.config import ConfigError, DataShape, MemeConfig
from meme.model.experts import build_denoiser
from meme.model.resources import check_fits
from meme.sampling.sample import load_run
from meme.training.train import Trainer
from nas.space.space import SPACES_DIR, load_space
from tests.meme.training.test_train import opts, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

FUZZ = settings(max_examples=40, deadline=timedelta(seconds=20), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
_names = itertools.count()


def refused_in_one_line(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, EXPECTED_ERRORS) and bool(text) and "\n" not in text


# ---- mutating plain (YAML-like) documents ------------------------------------------------

odd_values = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10), st.sampled_from([0, -1, 10 ** 9, 2 ** 63, -(10 ** 12)]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["3/4", "1/0", "5e-4", "iunet", "unet", "linear", "16", "-8", "nan"]),
    st.lists(st.integers(-4, 64), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def _paths(doc, prefix=()):
    """Every (path, value) of a nested dict/list document."""
    yield prefix, doc
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


def _mutate(doc, edits):
    """Apply (choice, kind, value) edits: replace a node, delete it, or add an unknown key."""
    doc = copy.deepcopy(doc)
    for choice, kind, value in edits:
        paths = [p for p, _ in _paths(doc) if p]
        if not paths:
            break
        path = paths[choice % len(paths)]
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if kind == "replace":
            parent[path[-1]] = value
        elif kind == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[f"extra_{choice}"] = value
    return doc


edits = st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from(["replace", "replace", "delete", "add"]),
                           odd_values), min_size=1, max_size=3)


def _check_config_text(text: str) -> None:
    """Load; a config that loads must fit-check, and a small one must build and run."""
    try:
        cfg = MemeConfig.from_yaml(text, "fuzz.yaml")
        est = check_fits(cfg, 2, "cpu")
    except ConfigError as exc:
        assert refused_in_one_line(exc), repr(exc)
        return
    if est.params < 2_000_000 and est.activation_bytes < 2 ** 28:
        den = build_denoiser(cfg)
        x = torch.zeros(1, cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
        with torch.no_grad():
            assert den(x, torch.tensor([0])).shape == x.shape


BASE_CONFIG = tiny_cfg().to_dict()


@FUZZ
@given(edits)
@example([(3, "replace", 10 ** 9)])                        # 10^9 channels: capped, never built
@example([(3, "replace", 16.0)])                           # an integral float is the int 16
@example([(3, "replace", "abc")])                          # int("abc") was a ValueError traceback
@example([(29, "replace", float("inf"))])                  # int(inf) in boundaries: OverflowError
@example([(7, "replace", [1, 2 ** 63])])                   # a huge ratio fraction
def test_any_config_document_loads_builds_or_is_refused_in_one_line(edits):
    _check_config_text(yaml.safe_dump(_mutate(BASE_CONFIG, edits)))


@FUZZ
@given(st.text(max_size=200))
@example("experts: [{base_channels: 1000000000}]")
@example("- !!python/object/apply:os.system ['true']")     # safe_load refuses tags that run code
@example("a: &a [1]\nb: *a\n")
@example("\x1f")                                            # yaml's ReaderError printed two lines
def test_any_yaml_text_loads_or_is_refused_in_one_line(text):
    _check_config_text(text)


BASE_SPACE = yaml.safe_load((SPACES_DIR / "tiny.yaml").read_text())


@settings(FUZZ, max_examples=30)
@given(edits)
@example([(10, "replace", 10 ** 9)])
@example([(24, "replace", "abc")])
def test_any_space_document_loads_or_is_refused_in_one_line(tmp_path_factory, edits):
    path = tmp_path_factory.mktemp("space") / "fuzz.yaml"
    path.write_text(yaml.safe_dump(_mutate(BASE_SPACE, edits)))
    try:
        load_space(path)
    except ConfigError as exc:
        assert refused_in_one_line(exc), repr(exc)


# ---- mutating checkpoints -------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real tiny run: config.yaml + checkpoints/last.pt after 2 steps, and its data."""
    from meme.training.train import train

    root = tmp_path_factory.mktemp("run")
    blobs = root / "blobs.npy"
    g = torch.Generator().manual_seed(0)
    np.save(blobs, (torch.rand(64, 1, 16, 16, generator=g) * 2 - 1).numpy())
    train(tiny_cfg(), opts(blobs, steps=2, ckpt_every=2), root / "run", progress=False)
    return root / "run", blobs


def _run_with(root: Path, run: Path, data: bytes) -> Path:
    new = root / f"run{next(_names)}"
    (new / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "config.yaml", new / "config.yaml")
    (new / "checkpoints" / "last.pt").write_bytes(data)
    return new


@settings(FUZZ, max_examples=40)
@given(flips=st.lists(st.integers(0, 2 ** 40), min_size=1, max_size=4), cut=st.none() | st.integers(0, 2 ** 40))
@example(flips=[100], cut=None)
def test_bit_flipped_or_truncated_checkpoint_is_refused(tmp_path_factory, trained_run, flips, cut):
    run, _ = trained_run
    data = bytearray((run / "checkpoints" / "last.pt").read_bytes())
    for f in flips:
        data[f % len(data)] ^= 1 << (f % 8)
    if cut is not None:
        data = data[: cut % len(data)]
    new = _run_with(tmp_path_factory.mktemp("flip"), run, bytes(data))
    try:
        load_run(new)
    except EXPECTED_ERRORS as exc:
        assert refused_in_one_line(exc), repr(exc)
    else:  # only a flip the CRC cannot see (zip padding, unused header fields) may load
        assert cut is None


@settings(FUZZ, max_examples=20)
@given(edits)
def test_checkpoint_with_keys_deleted_or_replaced_resumes_or_is_refused(tmp_path_factory, trained_run, edits):
    run, blobs = trained_run
    ck = checkpoint.load(run / "checkpoints" / "last.pt")
    plain = {k: v for k, v in ck.items()}
    for choice, kind, value in edits:   # edit the document: top-level keys and one level down
        keys = [(k,) for k in plain] + [(k, j) for k, v in plain.items() if isinstance(v, dict) for j in v]
        key = keys[choice % len(keys)]
        parent = plain if len(key) == 1 else dict(plain[key[0]])
        if len(key) == 2:
            plain[key[0]] = parent
        if kind == "delete":
            del parent[key[-1]]
        else:
            parent[key[-1]] = value
    new = tmp_path_factory.mktemp("keys") / "run"
    checkpoint.atomic_save(plain, new / "checkpoints" / "last.pt")
    trainer = Trainer(tiny_cfg(), opts(blobs, steps=4), new)
    try:
        trainer.load()
    except EXPECTED_ERRORS as exc:
        assert refused_in_one_line(exc), repr(exc)


# ---- mutating latent files -------------------------------------------------------------------

SHAPE = DataShape(1, 16, False)
INFO = LatentInfo(autoencoder="/nowhere/vae", kind="kl", scaling_factor=0.5, scaling="measured", image_channels=1,
                  image_resolution=64, latent_shape=(1, 16, 16), data="fashion-mnist", n=24)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8, torch.bool,
          torch.complex64]


def _check_latents(path: Path) -> None:
    try:
        info = latent_info(path)
        x = load_data(str(path), SHAPE, "train")
    except EXPECTED_ERRORS as exc:
        assert refused_in_one_line(exc), repr(exc)
        return
    assert info is None or isinstance(info, LatentInfo)
    assert x.dtype == torch.float32 and tuple(x.shape[1:]) == (1, 16, 16)


@settings(FUZZ, max_examples=40)
@given(dtype=st.sampled_from(DTYPES), shape=st.lists(st.integers(0, 20), min_size=0, max_size=5) | st.none(),
       meta=edits | st.none(), flips=st.lists(st.integers(0, 2 ** 40), max_size=2))
@example(dtype=torch.int32, shape=None, meta=None, flips=[])          # an int tensor is no latents
@example(dtype=torch.float32, shape=None, meta=[(2, "replace", "x")], flips=[])  # scaling_factor 'x'
def test_latent_pt_with_wrong_dtype_shape_or_record_is_refused(tmp_path_factory, dtype, shape, meta, flips):
    z = torch.randn(24, 1, 16, 16) if shape is None else torch.randn(shape)
    record = INFO.to_dict() if meta is None else _mutate(INFO.to_dict(), meta)
    path = tmp_path_factory.mktemp("lat") / f"z{next(_names)}.pt"
    torch.save({"latents": z.to(dtype), "autoencoder": record}, path)
    if flips:
        data = bytearray(path.read_bytes())
        for f in flips:
            data[f % len(data)] ^= 1 << (f % 8)
        path.write_bytes(bytes(data))
    _check_latents(path)


@settings(FUZZ, max_examples=30)
@given(claimed=st.lists(st.integers(0, 2 ** 31), min_size=1, max_size=4), cut=st.integers(0, 4096) | st.none())
@example(claimed=[2 ** 31, 1, 16, 16], cut=None)     # a header promising 8 GiB over 24 KiB of data
def test_npy_whose_header_lies_is_refused(tmp_path_factory, claimed, cut):
    path = tmp_path_factory.mktemp("npy") / f"z{next(_names)}.npy"
    np.save(path, np.zeros((24, 1, 16, 16), np.float32))
    data = path.read_bytes()
    header_end = data.index(b"\n") + 1
    header = data[:header_end].decode("latin1").replace("(24, 1, 16, 16)", str(tuple(claimed)))
    header = header[:-1].ljust(header_end - 1) + "\n" if len(header) <= header_end else header
    body = data[header_end:] if cut is None else data[header_end:header_end + cut]
    path.write_bytes(header.encode("latin1")[:header_end] + body)
    _check_latents(path)
