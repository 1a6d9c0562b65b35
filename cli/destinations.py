"""Every destination of a run checked before the work: no two outputs the same file, each one
free or a file of ours (pruning.files.is_ours), in a folder that exists and takes new files.
The library writes each file safely (pruning.files.atomic_write); the command line checks them
all first, so that a long run cannot fail at its end."""

import os
from pathlib import Path

from pruning.files import UserError, kind_of, new_temporary, refuse_unless_ours, remove_abandoned_temporaries, shown


def check_file_destination(option, path):
    """Fail now, before any long work, unless `path` can later be written: nothing there or a file
    of ours, in a folder that exists and takes new files, with a name that fits."""
    path = Path(path)
    kind = kind_of(path)
    if kind not in ("absent", "file"):
        raise UserError(f"{option} {shown(path)} is a {kind}, not a file")
    if kind == "file":
        refuse_unless_ours(path, option)
    folder = path.parent
    if kind_of(folder) == "absent":
        raise UserError(f"cannot write {shown(path)}: folder {shown(folder)} does not exist")
    if kind_of(folder) != "folder":
        raise UserError(f"cannot write {shown(path)}: {shown(folder)} is a {kind_of(folder)}, not a folder")
    probe_writable(path)


def probe_writable(path):
    """Whether a temporary file for path can be made beside it (and its name is not too long)."""
    try:
        remove_abandoned_temporaries(path)
        if len(os.fsencode(path.name)) > os.pathconf(path.parent, "PC_NAME_MAX"):
            raise UserError(f"cannot write {shown(path)}: the name is too long for the file system")
        f, probe = new_temporary(path)
        f.close()
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write {shown(path)}: {e.strerror}") from None


def check_folder_destination(option, folder):
    folder = Path(folder)
    kind = kind_of(folder)
    if kind == "absent":
        raise UserError(f"cannot write in {shown(folder)}: folder {shown(folder)} does not exist")
    if kind != "folder":
        raise UserError(f"{option} {shown(folder)} is a {kind}, not a folder")
    probe_writable(folder / "model.pt")


def make_folder(option, folder):
    """Make folder when its parent exists (and it does not); a folder that is there is used."""
    folder = Path(folder)
    if folder.is_symlink():
        raise UserError(f"{option} {shown(folder)} is a link; give a folder")
    if kind_of(folder) == "absent" and kind_of(folder.parent) == "folder":
        try:
            folder.mkdir()
        except OSError as e:
            raise UserError(f"cannot make the folder {shown(folder)}: {e.strerror}") from None
    check_folder_destination(option, folder)
    return folder


def check_distinct(paths):
    """Two outputs of one run must not be the same file. paths: (option, path) pairs, path None when not given."""
    seen = {}
    for option, path in paths:
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved in seen:
            raise UserError(f"{seen[resolved]} and {option} name the same file, {shown(resolved)}; give each its own")
        seen[resolved] = option
