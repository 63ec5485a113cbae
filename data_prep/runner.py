"""Runs data prep: plan -> dataset -> writer -> summary.

- plan: the cache's manifest, checked against the run's spec, and the source shards it does not hold
  yet (all, or those of `shards=`, at most `limit_shards`);
- dataset: one Ray Data execution over all of them, in source order: the actors start once per run
  (`data_prep/operators.py`);
- writer: the rows, counted under their shard, written and committed in waves of
  `output.shards_per_wave` shards (`latent_cache/writer.py`): a killed run resumes with no duplicates,
  and new shards added to the source later are appended;
- summary: the run's counts (`data_prep/summary.py` formats them).
"""

import contextlib
import dataclasses
import itertools
import time

from core import storage
from core.ray_cluster import connect
from data_prep.config import PrepConfig
from data_prep.filters import check_metadata_columns
from data_prep.operators import prep_dataset, read_shard
from data_prep.sources import reader_for
from latent_cache import manifest as manifests
from latent_cache.reader import Cache, existing_hashes
from latent_cache.writer import CacheWriter


@dataclasses.dataclass
class Plan:
    manifest: dict | None  # the cache's (settings checked against the spec); None: a new cache
    source_fs: object  # the filesystem of the source's listing (None for Twemoji): the read tasks get it
    shards_total: int  # in the source
    pending: list[tuple[str, str]]  # (shard URL, path) to prepare, in source order


def plan_run(cfg: PrepConfig, shards: list[str] | None = None) -> Plan:
    """What a run prepares: every source shard the cache does not hold yet (with `shards`, only those
    of them: what a retraining attempt recorded)."""
    fs, root = storage.resolve(cfg.output.url)
    manifest = manifests.read(fs, root)
    if manifest is not None:
        manifests.check_settings(manifest, cfg.encode.spec(), cfg.output.url)
    source_fs, all_shards = reader_for(cfg.source).list_shards(cfg.source.url)
    held = manifest["shards"] if manifest is not None else {}
    pending = [s for s in all_shards if s[0] not in held]
    if shards is not None:
        gone = sorted(set(shards) - {url for url, _ in all_shards} - set(held))
        if gone:
            raise FileNotFoundError(
                f"source shards to prepare are neither in {cfg.source.url} nor in the cache {cfg.output.url}: "
                f"{gone[:3]}; put them back, or drop the attempt that lists them"
            )
        wanted = set(shards)
        pending = [s for s in pending if s[0] in wanted]
    if cfg.limit_shards is not None:
        pending = pending[: cfg.limit_shards]
    if pending and cfg.filters.metadata:  # a threshold on a column the source lacks: said before any work
        url, path = pending[0]
        samples = itertools.islice(read_shard({"shard_url": url, "path": path}, cfg.source, source_fs), 200)
        check_metadata_columns(list(samples), cfg.filters, url)
    return Plan(manifest, source_fs, len(all_shards), pending)


def run_prep(cfg: PrepConfig, on_wave=None, shards: list[str] | None = None) -> dict:
    """Prepares the shards of `plan_run(cfg, shards)`; returns the run's summary. `on_wave(counts)`
    is called after each committed wave."""
    start = time.perf_counter()
    plan = plan_run(cfg, shards)
    provenance = {"source": {"url": cfg.source.url, "format": cfg.source.format}, "filters": dataclasses.asdict(cfg.filters)}
    writer = CacheWriter(cfg.output.url, cfg.encode.spec(), plan.manifest, [url for url, _ in plan.pending],
                         max_rows_per_file=cfg.output.max_rows_per_file, shards_per_wave=cfg.output.shards_per_wave,
                         provenance=provenance, on_wave=on_wave)
    if plan.pending:
        with contextlib.closing(_rows(cfg, plan)) as stream:  # on any failure, the execution stops at once
            for rows in stream:
                writer.add(rows)
    manifest = writer.finish()
    return {"cache": cfg.output.url, "shards_total": plan.shards_total, "shards_new": len(plan.pending),
            **writer.counts, "seconds": time.perf_counter() - start, "manifest": manifest}


def _rows(cfg: PrepConfig, plan: Plan):
    """The rows of the plan's shards as Arrow tables, in source order, from one Ray Data execution."""
    from ray.data import DataContext

    connect(cfg.ray_address, cfg.num_cpus)
    DataContext.get_current().execution_options.preserve_order = True  # the same input gives the same cache, run after run
    known = existing_hashes(Cache(cfg.output.url)) if plan.manifest and plan.manifest["files"] else []
    batches = iter(prep_dataset(cfg, plan.source_fs, plan.pending, known).iter_batches(batch_format="pyarrow", batch_size=None))
    with contextlib.closing(batches), _storage_errors_unwrapped():
        yield from batches


@contextlib.contextmanager
def _storage_errors_unwrapped():
    """A StorageError raised in a Ray task (a read task refused by S3) reaches the driver inside
    Ray's wrappers (RayTaskError, UserCodeException), whose text is a remote traceback: re-raised
    as the task raised it, so that the job says one line and exits 2."""
    try:
        yield
    except Exception as err:
        found, seen = None, set()
        while err is not None and id(err) not in seen:
            seen.add(id(err))
            if isinstance(err, storage.StorageError):
                found = err  # the innermost one is the task's own, with its own message
            err = getattr(err, "cause", None) or err.__cause__
        if found is None:
            raise
        # Ray Data appends lines of retry advice to the message, and Ray may have mixed its error
        # class into the type: the job gets our own class and our one line.
        kind = next(c for c in type(found).__mro__ if c.__module__ == storage.StorageError.__module__)
        raise kind(str(found).splitlines()[0]) from None
