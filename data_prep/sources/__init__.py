"""Source formats, one module each. A format's reader, built with that format's own options:
    list_shards(source_url) -> (filesystem or None, sorted [(shard URL, path)])
    iter_shard(shard_url, filesystem, path) -> the shard's raw samples (`samples.py`), streamed; bad
        data becomes dropped samples with their reason, never an exception
The shard URL is a shard's identity in the cache's manifest; the read tasks get the listing's
filesystem (it carries the region found for an S3 bucket)."""

from data_prep.sources.folder import FolderReader
from data_prep.sources.parquet import ParquetReader
from data_prep.sources.twemoji import TwemojiReader
from data_prep.sources.webdataset import WebDatasetReader

READERS = {"webdataset": WebDatasetReader, "parquet": ParquetReader, "folder": FolderReader, "twemoji": TwemojiReader}
FORMATS = tuple(READERS)


def reader(fmt: str, **options):
    """The reader of source format `fmt`, with that format's options (the fields of its class)."""
    if fmt not in READERS:
        raise ValueError(f"unknown source format {fmt!r}; expected one of {FORMATS}")
    return READERS[fmt](**options)


def reader_for(source):
    """The reader of a prep config's `source` (a SourceConfig), with its format's options."""
    return reader(source.format, **READERS[source.format].options(source))
