"""Small file utilities: atomic writes and SHA-256 digests.

Every file minidiff writes (weights, images, JSON records, checkpoints) goes through `atomic_write`: it is
written under a hidden temporary name in the destination folder and renamed over the target, so a reader,
a crash or a kill never sees a half-written file. No network and no image code: the networks, the loaders
and the tools all import this module, and it imports nothing of minidiff.
"""
import hashlib
import json
import os
import re
import tempfile

TMP_SUFFIX = ".tmp"  # hidden temporaries are named `.<name>.<random>.tmp` (see atomic_write)
# `.<name>.<8 random characters of mkstemp>.tmp`, the names atomic_write gives its temporaries
_TMP_NAME = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]{8}" + re.escape(TMP_SUFFIX) + "$")


def atomic_write(path, write):
    """Call write(tmp) on a temporary name in the destination folder, then rename it over `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=TMP_SUFFIX, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, path)  # atomic on POSIX and Windows within one folder
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale_temps(folder, targets):
    """Delete atomic_write temporaries for the files `targets` (names in `folder`) that a killed run left
    behind (SIGKILL gives no chance to clean up); returns the names removed. Call it before writing there."""
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        m = _TMP_NAME.match(name)
        if m and m.group("target") in targets and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


def probe_writable(path):
    """Create and remove a probe file in the folder `path`, or in the nearest existing folder above it when
    `path` does not exist yet (nothing else is created), and return that folder. NotADirectoryError (its
    message: the folder) when that is a file; OSError when nothing can be written there."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise NotADirectoryError(folder)
    fd, probe = tempfile.mkstemp(prefix=".minidiff-probe-", dir=folder)
    os.close(fd)
    os.remove(probe)
    return folder


def save_json_atomic(obj, path):
    """Write `obj` as indented JSON (UTF-8, trailing newline) at `path`, atomically."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def sha256_file(path, chunk=1 << 20):
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def listing_hash(rows, labels=0):
    """SHA-256 of a listing of files, the training runs' data fingerprint in config.json (names and sizes, not
    contents: cheap on 70,000 photos). Each row is `labels` names (e.g. a task) then file paths; a row is
    written as its names, then each path with its size (an in-memory photo, not a str: "memory"),
    tab-separated, one line per row, in order. Rows (input, gt) of photo pairs: labels=0; rows (task, photo):
    labels=1."""
    digest = hashlib.sha256()
    for row in rows:
        fields = [str(name) for name in row[:labels]]
        for p in row[labels:]:
            fields += [str(p), str(os.path.getsize(p)) if isinstance(p, str) else "memory"]
        digest.update(("\t".join(fields) + "\n").encode())
    return digest.hexdigest()


def sha256_path(path):
    """SHA-256 of a file, or {relative path: SHA-256} of every file under a folder (diffusers, plugins)."""
    if os.path.isfile(path):
        return sha256_file(path)
    found = {}
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            found[os.path.relpath(full, path)] = sha256_file(full)
    return found
