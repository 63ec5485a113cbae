"""Where data lives: the one way from a URL to a pyarrow filesystem and path, used by every module
that reads or writes storage (source readers, the latent cache, checkpoints, the lease, the registry).

URLs: a local path, `file:///abs/path`, `s3://bucket/prefix`, or any other scheme pyarrow knows
(`gs://`, `hdfs://`, through `pyarrow.fs.FileSystem.from_uri`).

s3:// takes its settings from the standard AWS environment: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL
and the credential chain. The bucket is asked once per process (HeadBucket) for its region, which
also says whether it exists and whether these credentials may use it. So a bucket outside the
default region works without AWS_REGION, and a missing bucket or a refusal is said up front, not
read as "no cache" or left to a traceback. `?region=NAME` in the URL states the region; it must be
the bucket's. Without credentials a bucket is used anonymously (public data sets) if it allows that.

Errors the user has to fix are `StorageError`s, which are ValueErrors: every job turns them into
exit 2 and a one-line message, like a configuration error.
"""

import functools
import os
import posixpath
import tempfile
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pyarrow.fs as pafs

DEFAULT_REGION = "us-east-1"  # what AWS assumes when nothing says otherwise


class StorageError(ValueError):
    """A URL whose storage cannot be used as it is set up (the jobs exit with 2)."""


class BucketNotFoundError(StorageError):
    pass


class AccessDeniedError(StorageError):
    pass


class MissingCredentialsError(AccessDeniedError):
    """Refused, and no AWS credentials were found to ask with."""


class WrongRegionError(StorageError):
    pass


def resolve(url: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path in it. For s3:// the filesystem carries the bucket's own
    region; it pickles with it, so Ray tasks given it use the same region as the driver."""
    if url.startswith("s3://"):
        parts = urlsplit(url)
        if not parts.netloc:
            raise StorageError(f"{url!r} names no bucket: an S3 URL is s3://BUCKET/prefix")
        stated = parse_qs(parts.query).get("region", [None])[0]
        region, anonymous = _bucket_access(parts.netloc, _endpoint(), stated)
        return _s3_filesystem(region, anonymous), (parts.netloc + parts.path).rstrip("/")
    if "://" in url and not url.startswith("file://"):
        return pafs.FileSystem.from_uri(url)
    return pafs.LocalFileSystem(), absolute(url)


def absolute(url: str) -> str:
    """A local path (or file:// URL) made absolute against this process's working directory; any
    other URL as it is. For what the driver hands to Ray workers, which run elsewhere."""
    if url.startswith("file://"):
        url = url[len("file://") :]
    elif "://" in url:
        return url
    return str(Path(url).expanduser().absolute())


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def write_text_atomically(fs: pafs.FileSystem, path: str, text: str) -> None:
    """Local: a temp file renamed over the target. S3: one PUT, which S3 makes visible all at once."""
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    try:
        with fs.open_output_stream(path) as f:
            f.write(text.encode())
    except OSError as err:
        raise_for_storage_error(err, path)
        raise


def read_text(fs: pafs.FileSystem, path: str) -> str | None:
    """The file's text, or None when there is no such file (a missing bucket or a refusal raises)."""
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except OSError as err:
        raise_for_storage_error(err, path)
        if isinstance(err, FileNotFoundError) or "not exist" in str(err).lower() or "not found" in str(err).lower():
            return None
        raise


# -- S3 ----------------------------------------------------------------------------------------

def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _env_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION


def _s3_filesystem(region: str, anonymous: bool) -> pafs.S3FileSystem:
    kwargs = {"region": region, "anonymous": anonymous}
    endpoint = _endpoint()
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or endpoint, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**kwargs)


@functools.lru_cache(maxsize=None)
def _bucket_access(bucket: str, endpoint: str | None, stated: str | None) -> tuple[str, bool]:
    """(the bucket's region, whether it is used anonymously), from one HeadBucket. Cached per bucket
    for the process; a failure is not cached (lru_cache keeps only results), so a retry asks again.

    botocore (there with s3fs) rather than pyarrow: `pyarrow.fs.resolve_s3_region` ignores the
    endpoint and cannot tell a refusal from a missing bucket."""
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ClientError

    session = botocore.session.get_session()
    anonymous = session.get_credentials() is None
    client = session.create_client(
        "s3", region_name=stated or _env_region(), endpoint_url=endpoint,
        config=Config(signature_version=UNSIGNED) if anonymous else None,
    )
    url = f"s3://{bucket}"
    try:
        headers = client.head_bucket(Bucket=bucket)["ResponseMetadata"]["HTTPHeaders"]
    except ClientError as err:
        meta = err.response.get("ResponseMetadata", {})
        status, region = meta.get("HTTPStatusCode"), meta.get("HTTPHeaders", {}).get("x-amz-bucket-region")
        if status == 404:
            raise BucketNotFoundError(
                f"{url}: no such bucket{_at(endpoint)}. Create it, or correct the bucket name in the URL."
            ) from None
        if status == 403:
            raise _refusal(url, anonymous, "may not use this bucket (HeadBucket: 403 Forbidden)") from None
        if status in (301, 400) and region and region != (stated or _env_region()):
            raise _wrong_region(url, region, stated) from None
        raise
    region = headers.get("x-amz-bucket-region")
    if stated and region and region != stated:
        raise _wrong_region(url, region, stated)
    return stated or region or _env_region(), anonymous


def _at(endpoint: str | None) -> str:
    return f" at {endpoint}" if endpoint else ""


def _refusal(url: str, anonymous: bool, what: str) -> AccessDeniedError:
    if anonymous:
        return MissingCredentialsError(
            f"{url}: no AWS credentials were found and anonymous access is refused. Set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an instance role) for an identity allowed to use it."
        )
    return AccessDeniedError(
        f"{url}: access denied: the AWS identity in use {what}. Grant it s3:ListBucket, s3:GetObject "
        "(and s3:PutObject where the job writes) on the bucket, or use other credentials."
    )


def _wrong_region(url: str, region: str, stated: str | None) -> WrongRegionError:
    said = f"the URL says ?region={stated}" if stated else f"the environment says {_env_region()}"
    return WrongRegionError(f"{url}: the bucket is in region {region}, {said}. Drop ?region= or set it to {region}.")


def raise_for_storage_error(err: OSError, path: str) -> None:
    """Raises the StorageError that a pyarrow S3 error on `path` stands for, if it stands for one
    (for code that reads through a resolved filesystem itself, like the shard readers)."""
    text = str(err)
    url = f"s3://{path}"
    if "ACCESS_DENIED" in text:
        import botocore.session

        anonymous = botocore.session.get_session().get_credentials() is None
        raise _refusal(url, anonymous, f"may not do this ({text.split(': ', 1)[-1]})") from err
    if "NO_SUCH_BUCKET" in text:
        raise BucketNotFoundError(f"{url}: no such bucket{_at(_endpoint())}. Create it, or correct the URL.") from err
    if "PermanentRedirect" in text or "AuthorizationHeaderMalformed" in text:
        raise WrongRegionError(f"{url}: the filesystem's region is not the bucket's ({text})") from err
