"""`ser cache info` and `ser cache verify`: what a store holds, and whether its bytes are intact."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import SerError, StoreCorrupt, StoreError
from .reader import CacheReader, open_cache

log = logging.getLogger(__name__)


def store_info(location: str, *, cache_dir: str | None = None) -> dict:
    """What a teammate needs to decide whether to train from a store."""
    with open_cache(location, cache_dir=cache_dir) as reader:
        meta = reader.meta
        hours = sum(reader.index.column("seconds").to_pylist()) / 3600
        size = reader.nbytes()
        return {
            "store": location, "source": reader.source.kind,
            "model_id": meta["model_id"], "model_sha256": meta["model_sha256"],
            "model_type": meta["model_type"], "layers": meta["layers"],
            "num_hidden_layers": meta["num_hidden_layers"], "hidden_size": meta["hidden_size"],
            "dtype": meta["dtype"], "frame_rate": meta["frame_rate"],
            "compression": meta.get("compression", "zstd"), "checksum": reader.checksum,
            "utterances": len(reader), "audio_hours": hours,
            "bytes": size, "files": len(reader.keys()), "bytes_per_audio_hour": size / hours if size and hours else None,
            "complete": meta.get("complete"), "failed": meta.get("failures", []),
            "created": meta.get("created"), "updated": meta.get("updated"),
            "versions": meta.get("versions", {}), "format_version": meta["format_version"],
            "manifest_columns": reader.table.column_names,
            "pooled_layers": reader.pooled_layers,
            "splits": _splits(reader.table),
        }


def _splits(table) -> dict:
    from .manifest import split_counts
    return split_counts(table)


def format_info(info: dict) -> str:
    size = f"{info['bytes'] / 2**20:.1f} MiB" if info["bytes"] is not None else "unknown"
    per_hour = (f"{info['bytes_per_audio_hour'] / 2**20:.1f} MiB per audio hour"
                if info["bytes_per_audio_hour"] else "")
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    lines = [
        f"store:        {info['store']}",
        f"model:        {info['model_id']} ({info['model_type']}, {info['num_hidden_layers']} layers, "
        f"hidden {info['hidden_size']})",
        f"weights:      sha256 {info['model_sha256']}",
        f"cached layer: {info['layers']} (states after transformer layer {info['layers']})",
        f"dtype:        {info['dtype']}, {info['frame_rate']:g} frames/s; compression "
        f"{info['compression']}, checksum {info['checksum']}",
        f"utterances:   {info['utterances']} ({info['audio_hours']:.3f} h of audio)"
        + (f"; splits {info['splits']}" if info["splits"] else ""),
        f"size:         {size} in {info['files']} files" + (f", {per_hour}" if per_hour else ""),
        f"complete:     {'yes' if info['complete'] else 'no: rerun `ser cache build` to finish'}",
        f"built:        {info['created']} (updated {info['updated']}); {versions}",
        f"columns:      {', '.join(info['manifest_columns'])}",
        "pooled:       " + (f"mean and std of layers {', '.join(map(str, info['pooled_layers']))}"
                             if info["pooled_layers"] else "none (build with --pooled-layers for `ser analyze probe`)"),
        f"failed:       {len(info['failed'])}",
    ]
    lines += [f"  {f['id']}: {f['error']}" for f in info["failed"][:20]]
    return "\n".join(lines)


@dataclass
class VerifyReport:
    store: str
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)  # ids whose bytes fail their checksum
    unreadable: list[str] = field(default_factory=list)  # ids whose index row cannot be right
    unnamed: int = 0  # problems of the store as a whole (an id listed twice, array metadata)
    building: bool = False  # _building/ exists: a build in progress or interrupted

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(location: str, *, cache_dir: str | None = None) -> VerifyReport:
    """Check the index (unique ids, aligned non-overlapping ranges inside the array) and every
    utterance's checksum. Damage is collected, not raised; an unreachable store raises."""
    with open_cache(location, cache_dir=cache_dir) as reader:
        report = verify_reader(reader)
    if os.path.isdir(os.path.join(location, "_building")):
        report.building = True
        report.problems.append("a build in progress or interrupted (_building/ exists): "
                               "rerun `ser cache build` to finish it")
    return report


def repair_store(location: str, report: VerifyReport) -> list[str]:
    """Forget the utterances `report` found damaged or impossibly indexed, so that running
    the store's `ser cache build` command again computes them anew; the rest of the store is
    kept. Their records leave index.parquet (atomically) and the store is marked incomplete;
    their old rows stay in the array, unused. Returns the ids forgotten.

    Raises:
        StoreError: not a local store folder, a build holds the store or left `_building/`,
            or a problem has no utterance to forget (an id listed twice).
    """
    from datetime import datetime, timezone
    from pathlib import Path

    from .lock import BuildLock
    from .store import StoreWriter, read_meta

    path = Path(location)
    if not path.is_dir() or read_meta(path) is None:
        raise StoreError(f"{location}: --repair works on a local store folder; copy the store "
                         "there (`ser cache copy`), repair the copy, and share it again")
    if report.building:
        raise StoreError(f"{location}: a build is in progress or was interrupted (_building/ "
                         "exists); rerun `ser cache build` to finish it, then verify again")
    if report.unnamed:
        raise StoreError(f"{location}: {report.unnamed} problem(s) name no single utterance to "
                         "compute again (an id listed twice, damaged array metadata); rebuild the "
                         "store with --overwrite, or copy it again from a good copy")
    ids = sorted(set(report.damaged) | set(report.unreadable))
    if not ids:
        return []
    lock = BuildLock(path)  # exclusive: refused, naming the holder, while a build runs
    try:
        meta = read_meta(path)
        writer = StoreWriter(path, meta)
        try:
            writer.retire(set(ids))
            writer.finalize(table=None, extra_meta={
                "complete": False, "utterances": len(writer.committed),
                "audio_hours": sum(r["seconds"] for r in writer.committed.values()) / 3600,
                "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        finally:
            writer.close()
    finally:
        lock.release()
    return ids


def verify_reader(reader: CacheReader) -> VerifyReport:
    """`verify_store` on an open reader (`ser cache copy` verifies its copy before publishing it)."""
    report = VerifyReport(store=reader.location)
    for problem in metadata_problems(reader):
        report.problems.append(problem)
        report.unnamed += 1
    unreadable = set()
    for uid, problem in index_problems(reader):
        report.problems.append(f"index: {problem}")
        if uid is not None:
            unreadable.add(uid)
        else:
            report.unnamed += 1
    report.unreadable = sorted(unreadable)
    for uid in reader.ids:
        if uid in unreadable:  # its row is impossible: reading it would mean nothing
            continue
        try:
            finite = np.isfinite(reader[uid]).all()
            if reader.pooled_layers:
                finite = finite and np.isfinite(reader.pooled(uid)).all()
            if not finite:  # its checksum matches: written so, by a build that did not check
                report.problems.append(f"'{uid}' holds NaN or Inf values")
                report.damaged.append(uid)
        except StoreCorrupt as err:
            report.problems.append(str(err).replace(f"{reader.location}: ", "", 1))
            report.damaged.append(uid)
        report.checked += 1
    return report


def metadata_problems(reader: CacheReader) -> list[str]:
    """Each array's own zarr.json must say what the root's consolidated copy (the one ser
    reads) says: zarr alone, without consolidated metadata, reads the array's own file."""
    import json

    consolidated = json.loads(reader.root_json)["consolidated_metadata"]["metadata"]
    problems = []
    for name, node in sorted(consolidated.items()):
        key = f"{name}/zarr.json"
        try:
            own = json.loads(reader._read_small(key) or b"null")
        except (ValueError, SerError) as err:
            if isinstance(err, StoreError) and not isinstance(err, StoreCorrupt):
                # unreachable (a server gone, a local copy read offline): nothing known
                log.warning("%s: %s not checked (%s)", reader.location, key, err)
            else:
                problems.append(f"{key} cannot be read ({err})")
            continue
        if own is None:
            problems.append(f"{key} is missing")
        elif _present(own) != _present(node):
            problems.append(f"{key} differs from its copy consolidated in zarr.json")
    return problems


def _present(node):
    """`node` without its null fields (writers differ in spelling an absent field)."""
    return {k: v for k, v in node.items() if v is not None} if isinstance(node, dict) else node


def index_problems(reader: CacheReader) -> list[tuple[str | None, str]]:
    """(id, problem) for every index row that cannot be right: no frames or negative ones, a
    negative start or one off the chunk grid, frames that disagree with the recorded seconds at
    the store's frame rate, a range outside the states array or overlapping another, an id
    listed twice. The id is None for a problem of the index as a whole."""
    chunk, rate = reader.meta["chunk_frames"], float(reader.meta["frame_rate"])
    capacity = reader.states.shape[0]
    rows = reader.index.select(["id", "start", "frames", "seconds"]).to_pylist()
    problems: list[tuple[str | None, str]] = []
    seen, twice = set(), []
    for r in rows:
        twice += [r["id"]] if r["id"] in seen else []
        seen.add(r["id"])
    if twice:
        problems.append((None, f"id(s) listed twice: {', '.join(repr(u) for u in sorted(set(twice))[:10])}"))
    good = []
    for r in rows:
        uid, start, frames, seconds = r["id"], r["start"], r["frames"], r["seconds"]
        if start is None or frames is None or seconds is None:
            problems.append((uid, f"'{uid}' has a blank start, frames or seconds"))
            continue
        if frames < 1:
            problems.append((uid, f"'{uid}' has {frames} frames; every utterance has at least 1"))
            continue
        if start < 0:
            problems.append((uid, f"'{uid}' starts at frame {start}, before the array"))
            continue
        if start % chunk:
            problems.append((uid, f"'{uid}' starts at frame {start}, not on a chunk of {chunk}"))
        expected = seconds * rate
        if not math.isfinite(expected) or abs(frames - expected) > max(2.0, 0.01 * expected):
            problems.append((uid, f"'{uid}' has {frames} frames but {seconds:g} s at {rate:g} "
                                  f"frames/s make about {expected:.0f}"))
        if start + frames > capacity:
            problems.append((uid, f"'{uid}' (frames {start}-{start + frames}) lies beyond the states "
                                  f"array ({capacity} frames)"))
            continue
        good.append((start, frames, uid))
    previous_end, previous_id = 0, None
    for start, frames, uid in sorted(good):
        if start < previous_end:
            problems.append((uid, f"'{uid}' overlaps '{previous_id}'"))
        if start + frames > previous_end:
            previous_end, previous_id = start + frames, uid
    return problems
