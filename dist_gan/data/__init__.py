"""Training data: sources -> (optionally) WebDataset shards -> the batch stream the loop draws from.

The loop sees only a ``BatchStream``: ``next_batch()`` returns images in [-1, 1] (N, C, H, W) and
labels; ``counters()`` reports skipped data; ``state_dict()`` / ``load_state_dict()`` carry the position
through a checkpoint so a resumed run reads exactly the batches the uninterrupted run would have read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from pathlib import Path
from typing import Protocol

import torch

from dist_gan.config import DEFAULT_SHARDS, DataConfig, lookup
from dist_gan.data.loader import ShardReader, ShardStream
from dist_gan.data.memory import InMemoryBatches
from dist_gan.data.mixtures import MIXTURES
from dist_gan.data.shards import (
    SHARD_MANIFEST,
    expand_urls,
    local_path,
    read_shard_manifest,
    resolve_encoding,
    resolve_shards,
    shard_dir_lock,
    write_shards,
)
from dist_gan.data.sources import (
    DATA_SOURCES,
    DataError,
    ImageSet,
    folder_images,
    limit_images,
    load_mnist_idx,
    read_idx,
)
from dist_gan.data.split import SplitPlan

__all__ = ["BatchStream", "DATA_SOURCES", "DataError", "ImageSet", "InMemoryBatches", "ShardStream",
           "build_batch_stream", "load_mnist_idx", "prepare_shards", "read_idx"]
log = logging.getLogger(__name__)


class BatchStream(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def counters(self) -> dict[str, int]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def close(self) -> None: ...


def prepare_shards(cfg: DataConfig, out_dir: str | Path, split: str = "train",
                   progress: bool = True, shards_multiple_of: int = 1) -> dict:
    """Write ``cfg.source``'s ``split`` as shards of at most ``cfg.shard_size`` samples into ``out_dir``;
    with ``shards_multiple_of`` = m, as a multiple of m shards of one size (the last one shorter),
    e.g. m = GPUs x loader workers. The directory is locked while it is written."""
    if cfg.source in MIXTURES:
        raise DataError(f"data.source={cfg.source} is 2-D points, not images: shards hold pixels; train "
                        "on it with data.format=memory")
    with shard_dir_lock(out_dir):
        return _write_source_shards(cfg, out_dir, split, progress, shards_multiple_of)


def _write_source_shards(cfg: DataConfig, out_dir: str | Path, split: str, progress: bool = True,
                         shards_multiple_of: int = 1, extra: dict | None = None,
                         replace: bool = False) -> dict:
    """``prepare_shards`` under a lock the caller holds (``extra``, ``replace``: see write_shards)."""
    images = lookup(DATA_SOURCES, "data.source", cfg.source)(cfg, split)
    if split == "train":
        images = limit_images(images, cfg.limit)
    shard_size = cfg.shard_size
    if shards_multiple_of > 1:
        count = shards_multiple_of * -(-len(images) // (cfg.shard_size * shards_multiple_of))
        shard_size = -(-len(images) // count)
        log.info("%d images in %d shards of %d (a multiple of %d shards)", len(images), count,
                 shard_size, shards_multiple_of)
    return write_shards(images, out_dir, split, shard_size, cfg.source, cfg.resolution,
                        cfg.channels, progress, cfg.strict, extra, replace, cfg.encoding)


def _prepare_if_missing(cfg: DataConfig) -> None:
    """Rank 0 (called inside main_process_first) writes the configured shards when none exist yet;
    a second run preparing the same directory waits for the first and then reuses its shards."""
    found = [local_path(u) for u in expand_urls(cfg.shards)]
    paths = [p for p in found if p is not None]
    if not cfg.prepare_if_missing or len(paths) < len(found) or any(p.exists() for p in paths):
        return
    out_dir, name = paths[0].parent, paths[0].name
    split = name.split("-")[0]
    if split not in ("train", "test") or not re.fullmatch(rf"{split}-\d{{6}}\.tar", name):
        raise DataError(f"data.shards={cfg.shards} names files like {name} that do not exist yet; shards "
                        f"written from data.source={cfg.source} are named train-NNNNNN.tar (or test-) "
                        "with six digits: name them so, or write them first with "
                        "`python -m dist_gan.data prepare`")
    with shard_dir_lock(out_dir):
        if any(p.exists() for p in paths):
            log.info("shards at %s were written by another run meanwhile: reusing them", cfg.shards)
        else:
            log.info("no shards at %s: preparing them from %s (data.prepare_if_missing)", cfg.shards,
                     cfg.source)
            _write_source_shards(cfg, out_dir, split)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataError(f"prepared {cfg.source} shards in {out_dir}, but data.shards={cfg.shards} names "
                        f"files that were not written, e.g. {missing[0]}: fix the pattern or data.shard_size")


def folder_fingerprint(folder: Path, follow_symlinks: bool = False) -> dict:
    """What identifies a folder's content cheaply: its image count and a digest of every image's
    path, size and modification time (a changed, added or removed image changes it)."""
    digest, count = hashlib.sha256(), 0
    for path, _ in folder_images(folder, follow_symlinks)[0]:
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        count += 1
    return {"path": str(folder.resolve()), "images": count, "digest": digest.hexdigest()}


def _folder_owner_problem(folder: Path, out_dir: Path, manifest_path: Path) -> str | None:
    """Why ``data.folder`` may not write shards into ``out_dir`` (None: it may): the directory holds
    shards that this folder did not write (another source, or another folder)."""
    if manifest_path.is_file():
        manifest = read_shard_manifest(manifest_path)
        known = manifest.get("folder")
        if known is not None and known.get("path") == str(folder.resolve()):
            return None
        held = f"folder {known.get('path')}" if known else f"data.source={manifest.get('source')}"
        return (f"{out_dir} holds the shards of {held} ({manifest_path}); data.folder={folder} would "
                "overwrite them")
    strays = sorted(out_dir.glob("train-*.tar"))
    if strays:
        return (f"{out_dir} holds shards with no manifest (e.g. {strays[0].name}); data.folder={folder} would "
                "overwrite them")
    return None


def _refuse_inside(folder: Path, name: str, path: Path) -> None:
    """A run or shard directory inside the image folder would feed its own outputs back as images."""
    if path.resolve().is_relative_to(folder.resolve()):
        raise DataError(f"{name} {path} is inside data.folder={folder}: its sample grids and shards would "
                        "become training images (their folders classes); put it outside the image folder")


def shards_from_folder(cfg: DataConfig, run_dir: str | Path, may_prepare: bool) -> DataConfig:
    """``cfg`` pointed at shards of ``cfg.folder``, written first (``may_prepare``: by this process,
    called inside ``main_process_first``) if there are none yet for the folder as it is now.

    Only shards this folder wrote are ever replaced (staged, then swapped, the manifest last); the
    directory is locked while it is checked and written, so runs sharing it take turns."""
    folder = Path(cfg.folder or "")
    if not cfg.folder or not folder.is_dir():
        raise DataError(f"data.folder={cfg.folder} is not a directory")
    first = local_path(expand_urls(cfg.shards)[0])
    out_dir = first.parent if cfg.shards != DEFAULT_SHARDS and first is not None else Path(run_dir) / "shards"
    _refuse_inside(folder, "the shard directory", out_dir)
    cfg = dataclasses.replace(cfg, source="folder", root=str(folder), prepare_if_missing=False,
                              manifest=str(out_dir / SHARD_MANIFEST))
    manifest_path = out_dir / SHARD_MANIFEST
    if may_prepare:
        with shard_dir_lock(out_dir):
            problem = _folder_owner_problem(folder, out_dir, manifest_path)
            if problem:
                raise DataError(f"{problem}: nothing was changed; set data.shards to another directory, "
                                "or leave it unset to use RUN_DIR/shards")
            fingerprint = {**folder_fingerprint(folder, cfg.follow_symlinks), "resolution": cfg.resolution,
                           "channels": cfg.channels,
                           "encoding": resolve_encoding(cfg.encoding, cfg.resolution, cfg.channels)}
            known = read_shard_manifest(manifest_path).get("folder") if manifest_path.is_file() else None
            if known == fingerprint:
                log.info("data.folder %s unchanged since its shards in %s were written: reusing them",
                         folder, out_dir)
            else:
                log.info("data.folder %s: writing shards to %s (%s)", folder, out_dir,
                         "first time" if known is None else "the folder, the resolution or the encoding changed")
                _write_source_shards(cfg, out_dir, "train", extra={"folder": fingerprint}, replace=True)
    names = [e["name"] for e in read_shard_manifest(manifest_path)["splits"]["train"]["shards"]]
    missing = [name for name in names if not (out_dir / name).is_file()]
    if missing:
        raise DataError(f"{manifest_path} lists {missing[0]}, which is not in {out_dir}: delete "
                        f"{manifest_path} and the run rewrites the shards from data.folder={folder}")
    return dataclasses.replace(cfg, shards="::".join(str(out_dir / name) for name in names))


def build_batch_stream(cfg: DataConfig, seed: int, rank: int, world_size: int,
                       device: torch.device | str, may_prepare: bool = False,
                       num_classes: int = 0, run_dir: str | Path = ".") -> BatchStream:
    """This rank's stream of batches as ``cfg`` says (``may_prepare``: this process may write shards;
    ``num_classes`` > 0: every label must be a class of a conditional model; ``run_dir``: where
    ``data.folder``'s shards go unless ``data.shards`` says)."""
    if cfg.folder:
        _refuse_inside(Path(cfg.folder), "run.dir", Path(run_dir))
        cfg = dataclasses.replace(cfg, source="folder", root=cfg.folder)
    if cfg.format == "memory":
        images = limit_images(lookup(DATA_SOURCES, "data.source", cfg.source)(cfg), cfg.limit)
        log.info("data: %s in memory, %d images%s", cfg.source, len(images),
                 ", each mirrored in alternate epochs (data.xflip)" if cfg.xflip else "")
        return InMemoryBatches.from_image_set(images, batch_size=cfg.batch_size, seed=seed, rank=rank,
                                              world_size=world_size, device=device,
                                              num_classes=num_classes, xflip=cfg.xflip)
    if cfg.folder and cfg.format == "shards":
        cfg = shards_from_folder(cfg, run_dir, may_prepare)
    elif may_prepare:
        _prepare_if_missing(cfg)
    shards, manifest = resolve_shards(cfg.shards, cfg.manifest, cfg.resolution, cfg.channels,
                                      cfg.strict)
    plan = SplitPlan([shard.count for shard in shards], world_size, cfg.workers, cfg.batch_size, seed,
                     cfg.resampled)
    reader = ShardReader(shards, plan, rank, cfg.resolution, cfg.channels, cfg.shuffle_buffer, cfg.strict,
                         cfg.xflip, cfg.read_timeout_s)
    stream = ShardStream(reader, cfg.workers, device, cfg.pin_memory, cfg.prefetch_factor, num_classes)
    log.info("data: %d shards, %d samples (%s), %d ranks x %d readers, %d batches per rank per epoch, "
             "%.1f%% of the samples used per epoch", len(shards), plan.total, manifest.get("source"),
             world_size, plan.workers_per_rank, stream.budget, 100 * plan.used_fraction)
    if plan.used_fraction < 0.98:
        log.warning("only %.1f%% of the %d samples are read per epoch by %d ranks x %d readers of "
                    "batch %d: add data or lower data.batch_size / data.workers",
                    100 * plan.used_fraction, plan.total, world_size, plan.workers_per_rank, cfg.batch_size)
    return stream
