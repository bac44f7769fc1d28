"""Where files live: a local path (or a shared filesystem's) or an object-store URI, as one
``Location`` (a pyarrow filesystem and a path on it), the way Ray Train keeps its runs.

``s3://bucket/path`` and ``gs://bucket/path`` take pyarrow's URI options; an S3-compatible
store's endpoint comes from ``?endpoint_override=http://host:port`` (Ray's convention) or from
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, which pyarrow does not read by itself.
Credentials come from the environment or the instance role; a URI's query is never shown in a
message (``Location.uri`` leaves it out).
"""

import io
import os
import posixpath
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import pyarrow.fs as pafs

from steelseg.errors import SteelsegError

SCHEMES = ("s3", "gs", "gcs")
CREDENTIALS = {"access_key", "secret_key", "session_token"}


@dataclass(frozen=True)
class Location:
    """A file or folder: ``fs`` and ``path`` on it. ``uri`` is how messages name it; ``target``
    is the whole URI (its query too: an endpoint, never credentials) that ``locate`` takes back,
    e.g. on another node."""

    fs: pafs.FileSystem
    path: str
    uri: str
    query: str = ""

    @property
    def target(self) -> str:
        return f"{self.uri}?{self.query}" if self.query else self.uri

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def __truediv__(self, part: str) -> "Location":
        uri = f"{self.uri.rstrip('/')}/{part}"
        return Location(self.fs, posixpath.join(self.path, part), uri, self.query)

    @property
    def parent(self) -> "Location":
        path = posixpath.dirname(self.path.rstrip("/"))
        uri = self.uri.rstrip("/").rsplit("/", 1)[0]
        return Location(self.fs, path, uri, self.query)

    def __str__(self) -> str:
        return self.uri

    # --- reading and writing -----------------------------------------------------------

    def info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path)
        except OSError as e:
            raise SteelsegError(f"{self.uri}: {reason(e)}") from None

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def children(self) -> list["Location"]:
        """The files and folders right below this folder (none if it does not exist)."""
        if not self.is_dir():
            return []
        selector = pafs.FileSelector(self.path, recursive=False)
        try:
            found = self.fs.get_file_info(selector)
        except OSError as e:
            raise SteelsegError(f"{self.uri}: {reason(e)}") from None
        return [self / posixpath.basename(info.path) for info in found]

    def read_bytes(self, limit: int | None = None) -> bytes:
        """The file's bytes, or its first ``limit`` bytes (one ranged request on a store)."""
        try:
            # a random-access file reads in one request; an input stream in many small ones
            # (70 MB: 0.2 s against 18 s from an S3-compatible server here)
            with self.fs.open_input_file(self.path) as f:
                return f.read(limit)
        except FileNotFoundError:
            raise SteelsegError(f"{self.uri}: no such file") from None
        except OSError as e:
            raise SteelsegError(f"{self.uri}: cannot read ({reason(e)})") from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        try:
            if self.local:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
        except OSError as e:
            raise SteelsegError(f"{self.uri}: cannot write ({reason(e)})") from None

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def open_buffer(self) -> io.BytesIO:
        return io.BytesIO(self.read_bytes())

    def mkdir(self) -> None:
        try:
            self.fs.create_dir(self.path, recursive=True)
        except OSError as e:
            raise SteelsegError(f"{self.uri}: cannot create ({reason(e)})") from None

    def check_new_file(self, overwrite: bool = False) -> None:
        """Refuse, before the work that makes it, a file that cannot be written here: a folder,
        an existing file (unless ``overwrite``), or one in a folder ``check_writable`` refuses.

        Raises:
            SteelsegError: naming this file and why.
        """
        info = self.info()
        if info.type == pafs.FileType.Directory:
            raise SteelsegError(f"{self.uri}: a folder; give the file to write")
        if info.type == pafs.FileType.File and not overwrite:
            raise SteelsegError(f"{self.uri}: already exists (--overwrite replaces it)")
        self.parent.check_writable(self)

    def check_writable(self, named: "Location | None" = None) -> None:
        """Refuse, before any work is done, a folder that cannot be written: a local one below a
        file or in a read-only place (it may not exist yet: the nearest existing folder above
        it is checked), or one in a bucket that does not exist. An object store's permissions
        are only known when writing.

        Raises:
            SteelsegError: naming this folder (or ``named``, a file to write in it) and why.
        """
        why = self._why_unwritable()
        if why:
            raise SteelsegError(f"{named or self}: cannot write there ({why})")

    def _why_unwritable(self) -> str | None:
        if not self.local:
            bucket = self.path.split("/")[0]
            if not Location(self.fs, bucket, self.uri, self.query).is_dir():
                return f"no bucket {bucket}"
            return None
        existing = Path(self.path)
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            return f"{existing} is a file"
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"{existing} is read-only"
        return None

    def upload(self, folder: str | os.PathLike) -> None:
        """Copy a local folder's files here (overwriting those of the same name)."""
        try:
            if self.local:  # pyarrow creates no local folders; an object store needs none
                Path(self.path).mkdir(parents=True, exist_ok=True)
            pafs.copy_files(
                str(folder),
                self.path,
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=self.fs,
            )
        except OSError as e:
            raise SteelsegError(f"{self.uri}: cannot upload ({reason(e)})") from None

    def download(self, folder: str | os.PathLike) -> Path:
        """Copy this folder's files into a local folder; returns it."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        if self.local:
            import shutil

            shutil.copytree(self.path, folder, dirs_exist_ok=True)
            return Path(folder)
        try:
            pafs.copy_files(
                self.path,
                str(folder),
                source_filesystem=self.fs,
                destination_filesystem=pafs.LocalFileSystem(),
            )
        except OSError as e:
            raise SteelsegError(f"{self.uri}: cannot download ({reason(e)})") from None
        return Path(folder)


def reason(error: Exception) -> str:
    """An error from pyarrow (an OSError, or a ValueError for a bad option), on one line and
    without request ids."""
    text = " ".join(str(error).split())
    return text.split(" (Request ID")[0]


def is_uri(value: str | os.PathLike) -> bool:
    return bool(urlsplit(str(value)).scheme) and "://" in str(value)


def shown(value: str | os.PathLike) -> str:
    """A path or URI as messages show it: a URI without its query."""
    if not is_uri(value):
        return str(value)
    parts = urlsplit(str(value))
    return f"{parts.scheme}://{parts.hostname or ''}{parts.path}"


def locate(value: "str | os.PathLike | Location", what: str) -> Location:
    """A local path (``~`` expanded, made absolute) or a URI as a ``Location``.

    Raises:
        SteelsegError: a scheme other than s3:// and gs://, or a URI pyarrow cannot use.
    """
    if isinstance(value, Location):
        return value
    text = str(value)
    if not is_uri(text):
        local = Path(os.path.expanduser(text)).resolve()
        return Location(pafs.LocalFileSystem(), str(local), str(local))
    check_uri(text, what)
    parts = urlsplit(text)
    query = dict(parse_qsl(parts.query))
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if parts.scheme == "s3" and endpoint and "endpoint_override" not in query:
        query["endpoint_override"] = endpoint
    encoded = urlencode(query)
    try:
        fs = _bucket_filesystem(parts.scheme, parts.hostname or "", encoded)
    except (OSError, ValueError, TypeError) as e:
        raise SteelsegError(f"{what} {shown(text)}: {reason(e)}") from None
    path = f"{parts.hostname or ''}{parts.path}".rstrip("/")
    return Location(fs, path, shown(text), encoded)


@lru_cache(maxsize=32)
def _bucket_filesystem(scheme: str, bucket: str, query: str) -> pafs.FileSystem:
    """One filesystem per bucket and options, made once per process: making one may ask the
    store for the bucket's region, and a data set's images are located one by one."""
    uri = f"{scheme}://{bucket}"
    return pafs.FileSystem.from_uri(f"{uri}?{query}" if query else uri)[0]


def check_uri(value: str, what: str) -> None:
    """Refuse, without reaching the store, a scheme we cannot use and credentials in a URI.

    Raises:
        SteelsegError: naming ``what`` and the URI without its query.
    """
    if not is_uri(value):
        return
    parts = urlsplit(value)
    if parts.scheme not in SCHEMES:
        raise SteelsegError(
            f"{what} {shown(value)}: {parts.scheme}:// is not supported; use a local or shared "
            "path, s3:// or gs://"
        )
    secret = sorted(set(dict(parse_qsl(parts.query))) & CREDENTIALS)
    if parts.username or parts.password:
        secret.insert(0, "user:password@")
    if secret:
        raise SteelsegError(
            f"{what} {shown(value)}: credentials in a URI ({', '.join(secret)}) would be stored "
            "with the run; set them in the environment (AWS_ACCESS_KEY_ID, ...) instead"
        )
