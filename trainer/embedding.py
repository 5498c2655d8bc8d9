"""`trainer embed` and `trainer verify`, and the embeddings verification during training uses.

Embeddings are L2-normalized: a margin head's own, the penultimate features of linear
and mlp heads (`models.embed`), with `--tta flip` fused with the mirror's (`trainer.tta`).
Under torchrun every rank embeds its shard and the shards are gathered once, back into
pack order; the figures come from `trainer.verification`.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from dali_pipes import BatchLoader, PackReader, build_loader, check_output, check_output_folder, plural
from trainer.checkpoint import atomic_write_bytes
from trainer.distributed import DistContext
from trainer.errors import TrainerError
from trainer.inference import checkpoint_file, image_batches, load_model
from trainer.pairs import Pairs, parse_pairs
from trainer.scoring import HostGather
from trainer.tta import tta_embed
from trainer.verification import FAR_TARGETS, MAX_SAMPLED_PAIRS, verification_report


@torch.no_grad()
def embed_batches(model: nn.Module, batches: Iterable[tuple[Any, torch.Tensor]], *,
                  amp_dtype: torch.dtype | None = None, tta: str = "none") -> tuple[np.ndarray, list[Any]]:
    """L2-normalized float32 embeddings of every batch `(key, images)`, and the keys (labels or paths) in order.

    The embeddings stay on the device and reach the host in a few large copies (`scoring.HostGather`).
    """
    model.eval()
    chunks, keys = HostGather(), []
    for key, images in batches:
        with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            features = tta_embed(model, images, tta)
        chunks.add(nn.functional.normalize(features.float(), dim=1))
        keys.append(key)
    embeddings = chunks.result()
    if embeddings is None:
        raise TrainerError("no images to embed")
    return embeddings.numpy(), keys


def gather_in_pack_order(ctx: DistContext, embeddings: np.ndarray, labels: np.ndarray,
                         expected: int) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's embeddings and labels on every rank, each sample once, in pack order.

    Eval shards are `split[rank::world_size]`, so interleaving the ranks' arrays restores
    the split's order. When a loader left samples out (unreadable images) the shards no
    longer line up and they are concatenated by rank instead.
    """
    if not ctx.enabled:
        return embeddings, labels
    import torch.distributed as dist

    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, (embeddings, labels))
    sizes = [len(p[1]) for p in parts]
    if sizes != [len(range(r, expected, ctx.world_size)) for r in range(ctx.world_size)]:
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    out_e = np.empty((expected, embeddings.shape[1]), dtype=embeddings.dtype)
    out_l = np.empty(expected, dtype=labels.dtype)
    for rank, (rank_embeddings, rank_labels) in enumerate(parts):
        out_e[rank :: ctx.world_size], out_l[rank :: ctx.world_size] = rank_embeddings, rank_labels
    return out_e, out_l


def split_embeddings(model: nn.Module, reader: PackReader, split: str, *, ctx: DistContext | None = None,
                     amp_dtype: torch.dtype | None = None, loader: BatchLoader | None = None, tta: str = "none",
                     **loader_args: Any) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and labels of every image of `split`, in pack order, on every rank.

    `loader` is this rank's eval loader of `split`; without one it is built from `loader_args`.
    """
    ctx = ctx or DistContext()
    if loader is None:
        loader = build_loader(reader, split, train=False, rank=ctx.rank, world_size=ctx.world_size, **loader_args)
    loader.set_epoch(0)
    embeddings, labels = embed_batches(model, ((batch_labels, images) for images, batch_labels in loader),
                                       amp_dtype=amp_dtype, tta=tta)
    local_labels = torch.cat(labels).cpu().numpy() if labels else np.zeros(0, dtype=np.int64)
    return gather_in_pack_order(ctx, embeddings, local_labels, len(reader.split_indices(split)))


def verification_figures(embeddings: np.ndarray, labels: np.ndarray, *, num_pairs: int | None = None, seed: int = 0,
                         pairs: Pairs | None = None,
                         device: torch.device | None = None) -> tuple[dict[str, Any], Any]:
    """`verification_report` over `pairs`, all pairs, or `num_pairs` of each kind drawn with `seed`; scored on
    `device`."""
    try:
        scored = torch.from_numpy(embeddings).to(device) if device is not None else embeddings
        return verification_report(scored, labels, pairs, num_pairs=num_pairs, seed=seed)
    except ValueError as exc:
        raise TrainerError(f"cannot verify: {exc}") from None


def embedding_files(out: Path, force: bool = False) -> list[Path]:
    """The files `--out` names (OUT.h5, or OUT.npy and OUT.json), checked before any work (`check_output`)."""
    suffix = out.suffix.lower()
    if suffix not in (".h5", ".hdf5", ".npy"):
        raise TrainerError(f"--out {out}: give a .h5 / .hdf5 file, or a .npy file (its metadata goes beside it as "
                           ".json)")
    files = [out] if suffix != ".npy" else [out, out.with_suffix(".json")]
    return [check_output(path, force) for path in files]


def write_embeddings(out: Path, embeddings: np.ndarray, meta: dict[str, Any]) -> list[Path]:
    """Write `embeddings` with `meta` (labels or paths, classes...): one HDF5 file, or OUT.npy + OUT.json;
    atomically."""
    if len(embedding_files(out, force=True)) == 1:
        import h5py

        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as f:
            f["embeddings"] = embeddings
            for key, value in meta.items():
                if isinstance(value, list) and value and isinstance(value[0], str):
                    f[key] = np.array(value, dtype=h5py.string_dtype())
                elif isinstance(value, (list, np.ndarray)):
                    f[key] = np.asarray(value)
                else:
                    f.attrs[key] = json.dumps(value)
        atomic_write_bytes(out, lambda file: file.write(buffer.getvalue()))
        return [out]
    npy = io.BytesIO()
    np.save(npy, embeddings)
    side = out.with_suffix(".json")
    atomic_write_bytes(out, lambda file: file.write(npy.getvalue()))
    text = json.dumps({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in meta.items()})
    atomic_write_bytes(side, lambda file: file.write(text.encode()))
    return [out, side]


def embed_command(checkpoint: Path, out: Path, *, pack: Path | None, split: str | None, inputs: Sequence[Path],
                  device: torch.device, batch_size: int = 64, backend: str = "auto", workers: int | None = None,
                  warn: Callable[[str], None] = print, force: bool = False, tta: str | None = None) -> dict[str, Any]:
    """`trainer embed`: embeddings of a pack split (with labels and paths) or of image files (with paths).

    `out` is checked before any work; existing files are replaced only with `force`.
    `tta` None is the checkpoint's own (its run's --tta).
    """
    if (pack is None) == (not inputs):
        raise TrainerError("give either --pack PACK --split SPLIT or image PATHS, not both and not neither")
    embedding_files(out, force)
    checkpoint = checkpoint_file(checkpoint)
    loaded = load_model(checkpoint, device)
    tta = tta or loaded.tta
    meta: dict[str, Any] = {"checkpoint": str(checkpoint), "arch": loaded.arch, "tta": tta}
    if pack is not None:
        reader = PackReader(pack)
        split = split or "test"
        embeddings, labels = split_embeddings(loaded.model, reader, split, backend=backend, batch_size=batch_size,
                                              device=device, num_workers=workers, spec=loaded.spec, tta=tta)
        indices = reader.split_indices(split)
        paths = [reader.paths[i] for i in indices] if len(labels) == len(indices) else []
        meta.update(pack=str(pack), split=split, labels=labels.astype(np.int64), paths=paths,
                    classes=list(reader.classes))
    else:
        embeddings, keys = embed_batches(loaded.model, image_batches(inputs, loaded.spec, device, batch_size, warn),
                                         tta=tta)
        meta["paths"] = [str(p) for batch in keys for p in batch]
    written = write_embeddings(out, embeddings, meta)
    return {"num_embeddings": int(len(embeddings)), "dim": int(embeddings.shape[1]), "files": [str(p) for p in written]}


def read_split_pairs(pairs_file: Path, reader: PackReader, split: str) -> Pairs:
    """The pairs of `--pairs`, as indices into `split`'s embeddings (pack order).

    A path may be written as the user has it: as stored in the pack (relative to the packed
    folder), absolute, or relative to the working directory, as long as it names a packed
    file of `split`.
    """
    position = {reader.paths[i]: n for n, i in enumerate(reader.split_indices(split))}
    source = Path(reader.options.get("source", "."))
    try:
        rows = parse_pairs(Path(pairs_file).read_text(), str(pairs_file))
    except OSError as exc:
        raise TrainerError(f"--pairs {pairs_file}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise TrainerError(str(exc)) from None
    found = {path: _packed_name(path, position, source) for row in rows for path in row[:2]}
    missing = [path for path, name in found.items() if name is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise TrainerError(f"--pairs {pairs_file}: {plural(len(missing), 'path')} {verb} "
                           f"not in the split ({split} of {reader.path}), e.g. {missing[0]!r}; give paths relative to "
                           f"the packed folder {source}, absolute, or relative to the working directory")
    a, b = (np.array([position[found[row[k]]] for row in rows], dtype=np.int64) for k in (0, 1))
    return Pairs(a, b, np.array([row[2] for row in rows], dtype=bool))


def _packed_name(path: str, packed: Mapping[str, int], source: Path) -> str | None:
    """The name a pack stores `path` under, or None: as written, or absolute or cwd-relative under `source`."""
    if path in packed:
        return path
    absolute = Path(path).expanduser().resolve()  # the packer stored `source` resolved too
    name = absolute.relative_to(source).as_posix() if absolute.is_relative_to(source) else None
    return name if name in packed else None


def verify_command(checkpoint: Path, pack: Path, *, split: str = "test", pairs_file: Path | None = None,
                   num_pairs: int | None = None, seed: int = 0, device: torch.device, batch_size: int = 64,
                   backend: str = "auto", workers: int | None = None, out: Path | None = None,
                   force: bool = False, tta: str | None = None) -> dict[str, Any]:
    """`trainer verify`: verification and rank-k identification figures of `checkpoint` on `split`; roc.png with `out`.

    Pairs: those of `pairs_file`, else `num_pairs` of each kind sampled without replacement, else all of them.
    `tta` None is the checkpoint's own (its run's --tta).
    """
    if pairs_file is not None and num_pairs is not None:
        raise TrainerError("give --pairs or --num-pairs, not both: a pairs file fixes the pairs")
    if num_pairs is not None and not 1 <= num_pairs <= MAX_SAMPLED_PAIRS:
        raise TrainerError(f"--num-pairs {num_pairs}: give 1 to {MAX_SAMPLED_PAIRS:,} (or leave it out to score all "
                           "pairs)")
    if out is not None:  # checked before any work; an existing roc.png is replaced only with `force`
        check_output(check_output_folder(out) / "roc.png", force)
    reader = PackReader(pack)
    pairs = read_split_pairs(pairs_file, reader, split) if pairs_file is not None else None
    loaded = load_model(checkpoint, device)
    embeddings, labels = split_embeddings(loaded.model, reader, split, backend=backend, batch_size=batch_size,
                                          device=device, num_workers=workers, spec=loaded.spec, tta=tta or loaded.tta)
    unread = len(reader.split_indices(split)) - len(labels)
    if pairs is not None and unread:
        raise TrainerError(f"{pack}: {plural(unread, 'image')} of {split} could not be read, so a pairs file cannot be "
                           "matched")
    figures, roc = verification_figures(embeddings, labels, num_pairs=num_pairs, seed=seed, pairs=pairs, device=device)
    if out is not None:
        from trainer.plots import plot_roc

        out.mkdir(parents=True, exist_ok=True)
        plot_roc(roc.far, roc.tar, out / "roc.png", title=f"{loaded.arch} on {split} of {Path(pack).name} "
                                                           f"({figures['num_pairs']:,} pairs, {figures['pairs']}, "
                                                           f"AUC {figures['auc']:.4f})")
    return figures


def format_verification(figures: dict[str, Any]) -> list[str]:
    """Human-readable lines for `verify_command`'s figures."""
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}%"

    tar = "  ".join(f"TAR@FAR={far:g} {pct(figures['tar_at_far'][f'{far:g}'])}" for far in FAR_TARGETS
                    if f"{far:g}" in figures["tar_at_far"])
    count = f"{figures['num_pairs']:,}"
    which = {"all": f"all {count} pairs", "sampled": f"{count} pairs sampled without replacement",
             "file": f"{count} pairs of --pairs"}
    these = {"all": "all pairs", "sampled": "the sampled pairs", "file": "these pairs"}
    return [f"{which[figures['pairs']]} ({figures['num_genuine']:,} genuine, {figures['num_impostor']:,} impostor)",
            f"  AUC {figures['auc']:.4f}  EER {pct(figures['eer'])}  accuracy {pct(figures['accuracy'])} "
            f"(10-fold over {these[figures['pairs']]}, threshold {figures['threshold']:.3f})",
            f"  {tar or 'TAR@FAR: too few impostor pairs (need 10 for FAR 0.1)'}",
            f"  identification: rank-1 {pct(figures['rank1'])}  rank-5 {pct(figures['rank5'])}"]
