"""Writing files safely: every destination checked before the work starts, each file written
atomically beside its destination, and nothing replaced that is not this project's own."""

import os
import stat
import zipfile
from pathlib import Path

import torch

TEMPORARY = ".{name}.{pid}.{n}.tmp"


class UserError(Exception):
    """A problem the user can fix; reported as one line, exit code 2."""


def atomic_write(path, write):
    """Call write(file) on a temporary file beside `path`, then rename it into place: a reader
    sees the old complete file or the new complete one, never a partial one. A new file gets the
    mode the umask gives; a replaced one keeps its own. A failed write leaves the old file as it
    was and says why in one line."""
    path = Path(path)
    remove_abandoned_temporaries(path)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~umask()
    tmp = path.parent / TEMPORARY.format(name=path.name, pid=os.getpid(), n=next_number())
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        raise


_written = 0


def next_number():
    global _written
    _written += 1
    return _written


def remove_abandoned_temporaries(path):
    """Temporary files that a killed run left beside `path`: those whose process is gone."""
    for tmp in path.parent.glob(TEMPORARY.format(name=path.name, pid="*", n="*")):
        pid = tmp.name[len(path.name) + 2:].split(".")[0]
        if pid.isdigit() and not alive(int(pid)):
            tmp.unlink(missing_ok=True)


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


def save_torch(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))
    return Path(path).stat().st_size


# Checking destinations before the work ------------------------------------------------

def kind_of(path):
    """'absent', 'file', 'folder', or what else stands at path (a device, a pipe, ...)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "absent"
    except OSError as e:
        raise UserError(f"cannot use {path}: {e.strerror}") from None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    return "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "pipe" if stat.S_ISFIFO(mode) else "socket"


def check_file_destination(option, path):
    """Fail now, before any long work, unless `path` can later be written atomically: absent or an
    ordinary file, in a folder that exists and takes new files, with a name that fits."""
    path = Path(path)
    kind = kind_of(path)
    if kind not in ("absent", "file"):
        raise UserError(f"{option} {path} is a {kind}, not a file")
    folder = path.parent
    if kind_of(folder) != "folder":
        raise UserError(f"cannot write {path}: folder {folder} does not exist")
    longest = TEMPORARY.format(name=path.name, pid=2 ** 22, n=10 ** 6)
    if len(longest.encode()) > os.pathconf(folder, "PC_NAME_MAX"):
        raise UserError(f"cannot write {path}: the name is too long for the file system "
                        f"(its temporary file's name too)")
    probe = folder / TEMPORARY.format(name=path.name, pid=os.getpid(), n="probe")
    try:
        probe.open("xb").close()
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None


def check_folder_destination(option, folder):
    folder = Path(folder)
    kind = kind_of(folder)
    if kind == "absent":
        raise UserError(f"cannot write in {folder}: folder {folder} does not exist")
    if kind != "folder":
        raise UserError(f"{option} {folder} is a {kind}, not a folder")
    check_file_destination(option, folder / "model.pt")


def is_ours_to_replace(path):
    """Whether an existing file at path may be replaced by a checkpoint: an empty file, or a
    PyTorch file (zip) that this project could have written, even if damaged or of other settings."""
    if path.stat().st_size == 0:
        return True
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return True  # a torch file cut short: what an interrupted copy of ours looks like
    if not any(name.endswith("/data.pkl") for name in names):
        return False
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return True
    return isinstance(saved, dict) and {"config", "state_dict"} <= saved.keys()


def check_checkpoint_destination(path):
    path = Path(path)
    check_file_destination("--checkpoint", path)
    if path.exists() and not is_ours_to_replace(path):
        raise UserError(f"--checkpoint {path} is not a checkpoint of this project; refusing to replace it "
                        "(give another path)")


def check_distinct(files, folders, checkpoint):
    """Two options must not name the same file, nor may a folder of outputs hold the checkpoint.
    files, folders: (option, path) pairs, path None when not given."""
    files = [(option, Path(path).resolve()) for option, path in files if path]
    for i, (a, path) in enumerate(files):
        for b, other in files[i + 1:]:
            if path == other:
                raise UserError(f"{a} and {b} name the same file, {path}; give each its own")
    for option, folder in folders:
        if folder and Path(folder).resolve() in Path(checkpoint).resolve().parents:
            raise UserError(f"{option} {folder} holds the checkpoint {checkpoint}; give the pruned models "
                            "another folder")
