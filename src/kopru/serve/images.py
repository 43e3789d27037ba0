"""Images a request carries: `data:` URLs and local files (under --allow-local-dir, opened without following
links), decoded within the limits, their pixels reserved before decoding."""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import io
import os
import stat
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from kopru.image_processing import ImageTooLargeError, load_image
from kopru.serve.errors import APIError, shown
from kopru.serve.limits import Reservation, ServerLimits


def decode_image(data: bytes, limits: ServerLimits, where: str, reservation: Reservation | None = None,
                 param: str | None = None) -> Image.Image:
    """Encoded bytes -> an RGB image (EXIF orientation applied, alpha and 16-bit modes converted as everywhere in
    Köprü: `kopru.image_processing.load_image`), refusing oversize or undecodable input with a 400 whose message
    starts with `where` (e.g. "image 2 of the request (messages[0].content[1].image_url)") and whose param is
    `param` (the field). The pixel count comes from the header, before the pixels are decoded (a small file can
    hold a huge image); they are reserved in `reservation` before decoding.
    """
    param = param or "messages"
    if len(data) > limits.max_image_bytes:
        raise APIError(400, f"{where}: the image is {len(data)} bytes; the limit is {limits.max_image_bytes}",
                       code="image_too_large", param=param)
    pixels = None
    try:
        with Image.open(io.BytesIO(data)) as probe:  # the header only
            width, height = probe.size
            pixels = width * height
    except Exception:  # noqa: BLE001, S110 - load_image, below, refuses it with a message naming `where`
        pass
    if pixels is not None and pixels > limits.max_image_pixels:
        raise APIError(400, f"{where}: the image is {width}x{height} = {pixels} pixels; the limit is "
                       f"{limits.max_image_pixels}", code="image_too_large", param=param)
    if reservation is not None and pixels is not None:
        reservation.take(pixels, where)
    try:
        image = load_image(data, max_pixels=limits.max_image_pixels, name=where)
    except ImageTooLargeError as error:  # Pillow's own ceiling, for limits set above it
        raise APIError(400, str(error), code="image_too_large", param=param) from None
    except Exception as error:  # noqa: BLE001 - hostile bytes make Pillow's plugins raise anything
        text = str(error) if str(error).startswith(where) else f"{where}: expected an image Pillow can read, " \
            f"found data it cannot decode ({type(error).__name__}: {error})"
        raise APIError(400, text, code="invalid_image", param=param) from None
    if reservation is not None and pixels is None:  # the header could not be probed alone, but it decoded
        reservation.take(image.width * image.height, where)
    return image


_OPEN_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_OPEN_FILE = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def local_files_supported() -> bool:
    """Whether this platform can open files one path component at a time without following links."""
    return hasattr(os, "O_NOFOLLOW") and os.open in os.supports_dir_fd


def read_local_file(text: str, root: Path, limit: int, where: str, param: str) -> bytes:
    """The bytes of the file `text` names (a path, absolute or relative to the working directory), which must lie
    under `root`, read without a check-then-read race: each component is opened relative to the one before it
    (openat) with O_NOFOLLOW, so no symbolic link is followed at any level, and the file is checked after it is
    opened (a regular file, at most `limit` bytes). Every refusal is an APIError 400."""
    def refuse(message: str, code: str = "invalid_image_url") -> APIError:
        return APIError(400, f"{where}: {message}", code=code, param=param)

    if "\x00" in text:
        raise refuse("expected a file path, found a NUL byte in it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise refuse("expected a file path of encodable characters, found a lone surrogate in it") from None
    path = Path(os.path.abspath(os.path.expanduser(text)))
    if ".." in Path(os.path.expanduser(text)).parts:
        raise refuse(f"expected a path without '..', found {shown(text)}", "local_files_refused")
    relative = None
    for base in (Path(os.path.abspath(root)), root.resolve()):  # as given, and with its own links resolved
        if path.is_relative_to(base):
            relative = path.relative_to(base).parts
            break
    if relative is None:
        raise refuse(f"{shown(str(path), 200)} is outside the allowed directory {str(root.resolve())!r}",
                     "local_files_refused")
    if not relative:
        raise refuse(f"expected a file, found the allowed directory itself ({str(root.resolve())!r})")
    descriptor = os.open(root.resolve(), _OPEN_DIRECTORY)  # the root is the server's own setting: links allowed
    try:
        for depth, name in enumerate(relative):
            last = depth == len(relative) - 1
            try:
                child = os.open(name, _OPEN_FILE if last else _OPEN_DIRECTORY, dir_fd=descriptor)
            except OSError as error:
                raise _open_refusal(error, name, descriptor, refuse) from None
            os.close(descriptor)
            descriptor = child
        info = os.fstat(descriptor)  # of what was opened: no other file can take its place now
        if not stat.S_ISREG(info.st_mode):
            raise refuse(f"expected a regular file at {shown(str(path), 200)}, found something else (a directory, "
                         "a device or a pipe)")
        if info.st_size > limit:
            raise APIError(400, f"{where}: the file is {info.st_size} bytes; the limit is {limit}",
                           code="image_too_large", param=param)
        os.set_blocking(descriptor, True)
        chunks, size = [], 0
        while size <= limit:  # the file may grow after fstat: never read more than the limit
            chunk = os.read(descriptor, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise APIError(400, f"{where}: the file grew past the limit of {limit} bytes while it was read",
                           code="image_too_large", param=param)
        return b"".join(chunks)
    finally:
        os.close(descriptor)


def _open_refusal(error: OSError, name: str, directory: int, refuse) -> APIError:
    quoted = shown(name, 80)
    is_link = False
    with contextlib.suppress(OSError):  # only for the message: the refusal does not depend on it
        is_link = stat.S_ISLNK(os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode)
    if error.errno == errno.ELOOP or is_link:
        return refuse(f"{quoted} is a symbolic link; links are not followed under the allowed directory",
                      "local_files_refused")
    if error.errno == errno.ENOENT:
        return refuse(f"no file or directory named {quoted} there")
    if error.errno == errno.ENOTDIR:
        return refuse(f"expected {quoted} to be a directory, found a file")
    if error.errno == errno.ENAMETOOLONG:
        return refuse(f"a name in the path is longer than the file system allows ({len(name)} characters)")
    if error.errno in (errno.EACCES, errno.EPERM):
        return refuse(f"{quoted} is not readable by the server")
    return refuse(f"cannot open {quoted}: {os.strerror(error.errno or 0)}")


def read_image_url(url: str, limits: ServerLimits, allow_local_dir: Path | None, where: str,
                   reservation: Reservation | None = None, param: str | None = None) -> Image.Image:
    """A data: URL with base64 content, or a local file (file:// URL or path) under `allow_local_dir`."""
    param = param or "messages"
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or ";base64" not in header:
            raise APIError(400, f"{where}: expected a data URL like 'data:image/png;base64,<data>', found "
                           f"{shown(url, 40)}", code="invalid_image_url", param=param)
        if len(payload) > 4 * (limits.max_image_bytes // 3 + 1) + 4:  # before decoding anything large
            raise APIError(400, f"{where}: the encoded image exceeds the limit of {limits.max_image_bytes} bytes",
                           code="image_too_large", param=param)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: the data URL's content is not valid base64", code="invalid_image_url",
                           param=param) from None
        return decode_image(data, limits, where, reservation, param)
    try:
        scheme = urlparse(url).scheme
    except ValueError as error:  # e.g. an unbalanced '[' in what would be the host
        raise APIError(400, f"{where}: expected a data: URL, a file:// URL or a path, found {shown(url)} "
                       f"({error})", code="invalid_image_url", param=param) from None
    if scheme in ("http", "https"):
        raise APIError(400, f"{where}: remote image URLs are not fetched by this server; send the image as a "
                       "data: URL (base64)", code="invalid_image_url", param=param)
    if scheme not in ("", "file"):
        raise APIError(400, f"{where}: expected a data: URL, a file:// URL or a path, found scheme {scheme!r}",
                       code="invalid_image_url", param=param)
    if allow_local_dir is None:
        raise APIError(400, f"{where}: local image files are refused; start the server with --allow-local-dir DIR "
                       "to serve files under DIR", code="local_files_refused", param=param)
    path = unquote(urlparse(url).path) if scheme == "file" else url
    data = read_local_file(path, allow_local_dir, limits.max_image_bytes, where, param)
    return decode_image(data, limits, where, reservation, param)
