"""Files, safely. A destination is written only where nothing stands or where a file stands that
this project wrote (recognised by its content, not its name), checked before the work and again
at the moment the finished file is moved into place; every file is written beside its destination
and renamed, so a reader sees the old whole file or the new one. A file is read only if it is a
regular file, and no larger than what it may be."""

import contextlib
import glob
import json
import os
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import torch

TEMPORARY = ".{name}.{pid}.{n}.tmp"  # name: the destination's, cut to NAME_KEPT characters
NAME_KEPT = 120
WRITER = "pruning: neural-network pruning for model compression"  # in every file this project writes
MAX_RESULTS_BYTES = 64 << 20
MAX_PICKLE_BYTES = 1 << 20  # a file's structure (architecture, names, what it says about itself), not its numbers
MAX_TORCH_BYTES = 8 * 10_000_000 + (1 << 20)  # the largest model file this project writes: 10M fp32 values


class UserError(Exception):
    """A problem the user can fix; reported as one line, exit code 2."""


def atomic_write(path, write):
    """Call write(file) on a temporary file beside `path`, then move it into place, if what stands
    at path then is nothing or a file of ours. A new file gets the mode the umask gives; a replaced
    one keeps its own. A failed write leaves the old file as it was and says why in one line."""
    path = Path(path)
    remove_abandoned_temporaries(path)
    tmp = None
    try:
        f, tmp = new_temporary(path)
        with f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~umask())
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # succeeds only where nothing stands
        except FileExistsError:
            refuse_unless_ours(path)
            os.chmod(tmp, path.stat().st_mode & 0o777)
            os.replace(tmp, path)
    except BaseException as e:
        remove_quietly(tmp)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {shown(path)}: {e.strerror or e}") from None
        raise
    remove_quietly(tmp)


def new_temporary(path):
    """(open file, its path): a new temporary file beside path, never one that stood there."""
    for _ in range(100):
        tmp = path.parent / TEMPORARY.format(name=path.name[:NAME_KEPT], pid=os.getpid(), n=next_number())
        try:
            return open(tmp, "xb"), tmp
        except FileExistsError:
            continue  # something of that name stands there: not ours to touch
    raise UserError(f"cannot write {shown(path)}: no free name for its temporary file")


def remove_quietly(tmp):
    """Remove our temporary file if it is there; a folder that refuses leaves it, harmless."""
    if tmp is not None:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


_written = 0


def next_number():
    global _written
    _written += 1
    return _written


def shown(path, limit=200):
    """A path as one line can print it, whatever bytes or line breaks its name holds, cut to a
    readable length."""
    text = str(path).encode("utf-8", "backslashreplace").decode()
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= limit else text[:limit // 2] + "..." + text[-limit // 2:]


def remove_abandoned_temporaries(path):
    """Temporary files that a killed run left beside `path`: those named as ours whose process is
    gone and that are whole files of ours, or empty (a probe's: nothing to lose). Nothing is
    removed by its name alone: a cut-short one stays, harmless."""
    name = path.name[:NAME_KEPT]
    pattern = TEMPORARY.format(name=glob.escape(name), pid="*", n="*")
    for tmp in path.parent.glob(pattern):
        pid = tmp.name[len(name) + 2:].split(".")[0]
        if pid.isdigit() and not alive(int(pid)) and kind_of(tmp) == "file" and (
                tmp.stat().st_size == 0 or is_ours(tmp)):
            remove_quietly(tmp)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def umask():
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


# What is ours ---------------------------------------------------------------------------

def is_ours(path):
    """Whether the regular file at path is one this project wrote: a results JSON, a figure, a
    model file (PyTorch, compressed or ONNX) of ours."""
    try:
        if kind_of(Path(path)) != "file":
            return False
        with open(path, "rb") as f:
            head = f.read(8)
        if head.startswith(b"\x89PNG"):
            return png_text(path).get("Software") == WRITER
        if head.startswith(b"PK\x03\x04"):
            return torch_file_of_ours(path)
        if head.startswith(b"MLPZ"):
            return compressed_file_of_ours(path)
        if head.lstrip().startswith(b"{"):
            return results_of_ours(path)
        return onnx_file_of_ours(path)
    except (OSError, ValueError, struct.error, zipfile.BadZipFile, UserError):
        return False


def results_of_ours(path):
    if Path(path).stat().st_size > MAX_RESULTS_BYTES:
        return False
    try:
        results = json.loads(Path(path).read_bytes())
    except (ValueError, RecursionError):
        return False
    return isinstance(results, dict) and results.get("written_by") == WRITER  # keys anyone can write prove nothing


def png_text(path):
    """The tEXt chunks of a PNG file before its image data, as {keyword: text}."""
    text = {}
    with open(path, "rb") as f:
        f.read(8)
        while True:
            header = f.read(8)
            if len(header) < 8:
                return text
            length, kind = struct.unpack(">I4s", header)
            if kind in (b"IDAT", b"IEND") or length > 1 << 20:
                return text
            data = f.read(length)
            f.read(4)
            if kind == b"tEXt" and b"\0" in data:
                key, value = data.split(b"\0", 1)
                text[key.decode("latin-1")] = value.decode("latin-1")


def torch_file_of_ours(path):
    try:
        read_torch_dict(path, MAX_TORCH_BYTES)
    except UserError:
        return False
    return True


def read_torch_dict(path, limit, what="file"):
    """The dict a PyTorch file this project wrote holds (its 'written_by' is ours), read only after
    its entries are checked against its size and with weights_only: no code in it ever runs."""
    check_readable(path, limit, what)
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"{shown(path)} is not a model file of this project ({e})") from None
    size = Path(path).stat().st_size
    structure = sum(e.file_size for e in entries if e.filename.endswith("/data.pkl"))
    if structure > MAX_PICKLE_BYTES:
        raise UserError(f"{shown(path)} is not a model file of this project: its description is {structure:,} "
                        f"bytes, more than any of ours ({MAX_PICKLE_BYTES:,})")
    if (not any(e.filename.endswith("/data.pkl") for e in entries)
            or any(e.compress_type != zipfile.ZIP_STORED for e in entries)
            or sum(e.file_size for e in entries) > size):
        raise UserError(f"{shown(path)} is not a model file of this project")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{shown(path)} is not a model file of this project, or is damaged "
                        f"({type(e).__name__})") from None
    if not isinstance(saved, dict) or saved.get("written_by") != WRITER:
        raise UserError(f"{shown(path)} is not a model file of this project")
    return saved


def compressed_file_of_ours(path):
    with open(path, "rb") as f:
        header = f.read(13)
        if len(header) < 13:
            return False
        _, _, length, crc = struct.unpack("<4sBII", header)
        if Path(path).stat().st_size != 13 + length:
            return False
        return zlib.crc32(f.read(length)) == crc


def onnx_file_of_ours(path):
    if Path(path).stat().st_size > 512 << 20:
        return False
    data = Path(path).read_bytes()
    return WRITER.encode() in data and data[:1] == b"\x08"  # an ONNX ModelProto starts with its ir_version


def refuse_unless_ours(path, option=None):
    """A UserError unless path holds a file this project wrote (option: the command-line option
    that named it, for the message)."""
    if not is_ours(path):
        raise UserError(f"{option + ' ' if option else ''}{shown(path)} is not a file this project wrote; "
                        "refusing to replace it (give another path)")


def kind_of(path):
    """'absent', 'file', 'folder', 'link' (to nothing) or what else stands at path (a device, a pipe, ...)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "link to nothing" if path.is_symlink() else "absent"
    except OSError as e:
        raise UserError(f"cannot use {shown(path)}: {e.strerror}") from None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    return "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "pipe" if stat.S_ISFIFO(mode) else "socket"


# Reading --------------------------------------------------------------------------------

def check_readable(path, limit, what="file"):
    """The size of the regular file at path; a UserError unless it is one of at most limit bytes."""
    path = Path(path)
    kind = kind_of(path)
    if kind == "absent":
        raise UserError(f"{shown(path)} does not exist")
    if kind != "file":
        raise UserError(f"{shown(path)} is a {kind}, not a {what}")
    size = path.stat().st_size
    if size > limit:
        raise UserError(f"{shown(path)} is {size:,} bytes, more than any {what} of this project ({limit:,})")
    return size
