"""Where the workers read and write the portal's files: job bundles, global models, updates,
server states, checkpoints.

Django's default storage holds them: the file system under ``MEDIA_ROOT`` (the default; one
host, or a volume every portal and worker mounts), or an S3-compatible object store through
django-storages when ``FEDPORTAL_S3_BUCKET`` is set (settings). The aggregation reads files
from disk, in chunks and through memory maps, so with an object store a worker works on local
copies:

- :func:`local_path` gives a path on this host holding a stored file's bytes. On the file
  system, the file itself. With an object store, a copy under ``FEDPORTAL_STORAGE_CACHE_DIR``,
  downloaded in parts of :data:`PART_BYTES` by several threads (memory bounded by the parts in
  flight, never the file), and used again while its ETag is the object's.
- :func:`path_to_write` then :func:`publish`: a file made on this host (a new global model, a
  server state, a checkpoint, an upload) is written at ``path_to_write(name)``, then stored. On
  the file system it was written in place and ``publish`` does nothing; with an object store
  it is uploaded in parts (S3's multipart upload, memory bounded the same way).
- :func:`forget` drops local copies that will not be read again (a closed round's updates).

The names are the storage's (a file field's ``name``), the same in every process; a worker on
another host finds what a portal stored under the same name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.files.storage import FileSystemStorage, default_storage

# The size of the parts an object is read and written in, and how many move at once: what a
# transfer holds in memory is about their product, whatever the file's size.
PART_BYTES = 8 * 1024 * 1024
PARTS_IN_FLIGHT = 8


def on_file_system() -> bool:
    """Whether the default storage is the file system (every file has a local path)."""
    storage = _storage()
    if isinstance(storage, FileSystemStorage):
        return True
    if _is_s3(storage):
        return False
    raise ImproperlyConfigured(
        f"the default storage {type(storage).__name__} is neither the file system nor S3: "
        "the workers need one of those (STORAGES['default'])"
    )


def local_path(name: str | None) -> Path:
    """A path on this host that holds the stored file ``name`` (a file field's name; None or
    empty when the field holds no file: FileNotFoundError)."""
    if not name:
        raise FileNotFoundError("the file field holds no file")
    if on_file_system():
        return Path(_storage().path(name))
    path = _cache_path(name)
    tag = _object_tag(name)  # FileNotFoundError when there is no such object
    if path.exists() and _tag_path(path).is_file() and _tag_path(path).read_text() == tag:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        _client().download_file(_bucket(), _key(name), partial, Config=_transfer())
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    _tag_path(path).write_text(tag)
    return path


def path_to_write(name: str) -> Path:
    """Where to write the file that will be stored as ``name`` (its folders made)."""
    path = Path(_storage().path(name)) if on_file_system() else _cache_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def publish(name: str, *, keep_local: bool = True) -> None:
    """Store the file written at ``path_to_write(name)`` as ``name``. With an object store it is
    uploaded, and the local copy kept for the next reader on this host (``keep_local``) or
    removed (the portal, which reads an upload never again)."""
    if on_file_system():
        return
    path = _cache_path(name)
    _client().upload_file(str(path), _bucket(), _key(name), Config=_transfer())
    if keep_local:
        _tag_path(path).write_text(_object_tag(name))
    else:
        forget([name])


def forget(names: Iterable[str | None]) -> None:
    """Drop this host's copies of ``names`` (the stored files stay). Nothing on the file
    system, where the copy is the file."""
    if on_file_system():
        return
    for name in names:
        if name:
            path = _cache_path(name)
            for stale in (path, _tag_path(path)):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()


# --- S3 through django-storages --------------------------------------------------------------


def _storage() -> Any:
    # Untyped on purpose: the S3 storage's attributes (connection, bucket_name) are not on
    # Django's Storage type. A lazy object, set up again when a test changes STORAGES.
    return default_storage


def _is_s3(storage: Any) -> bool:
    try:
        from storages.backends.s3 import S3Storage
    except ImportError:  # the portal extra is not installed: no object store either
        return False
    return isinstance(storage, S3Storage)


def _client() -> Any:
    return _storage().connection.meta.client


def _bucket() -> str:
    return str(_storage().bucket_name)


def _key(name: str) -> str:
    """The object key of ``name``: the storage's own normalising (its ``location`` prefix)."""
    from storages.utils import clean_name

    storage = _storage()
    return str(storage._normalize_name(clean_name(name)))


def _object_tag(name: str) -> str:
    """The object's ETag: it changes whenever the object does."""
    from botocore.exceptions import ClientError

    try:
        head = _client().head_object(Bucket=_bucket(), Key=_key(name))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            raise FileNotFoundError(f"{name}: no such object in the store") from None
        raise
    return str(head["ETag"])


def _transfer() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=PART_BYTES,
        multipart_chunksize=PART_BYTES,
        max_concurrency=PARTS_IN_FLIGHT,
        use_threads=True,
    )


def _cache_path(name: str) -> Path:
    root = Path(settings.FEDPORTAL_STORAGE_CACHE_DIR).resolve()
    path = (root / name).resolve()
    if root not in path.parents:  # names are the storage's own; never outside the cache
        raise ValueError(f"storage name {name!r} leaves the cache folder")
    return path


def _tag_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.etag")
