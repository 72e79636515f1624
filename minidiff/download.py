"""Where minidiff's weight files come from, and a small resumable downloader (urllib only, no hub client).

`CHECKPOINTS` is the registry: a key (what `python tools/download.py --only KEY` takes) -> the file or folder
under checkpoints/ that the loaders are given, what it is, and the remote files that make it up (URL, size in
bytes and sha256 where they are published). `missing_weights_message(paths)` turns missing paths into one
message saying what each file is, how big, and the command that fetches it. `download(...)` fetches files:
HTTP Range requests resume into `<file>.part`, the size and sha256 are checked, then the file is renamed
into place, so a final file is always complete. HF_TOKEN is sent as a Bearer token to Hugging Face only
(never on to the CDN a download is redirected to); HF_ENDPOINT points Hugging Face URLs at a mirror.

Sources: the Stable Diffusion 1.5 / 1.4 and CLIP model cards on huggingface.co, yuhaoliu7456/Diff-Plugin
(pre-trained/, CC BY-NC-SA 4.0), openai/CLIP clip/clip.py (_MODELS: the sha256 is part of each URL),
mseitzer/pytorch-fid src/pytorch_fid/inception.py (FID_WEIGHTS_URL). Sizes and hashes: the Hugging Face
LFS pointers and the values those projects check; None where nobody publishes one (then only the size the
server reports is checked).
"""
import hashlib
import http.client
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePath

from tqdm import tqdm

from minidiff.errors import DownloadError  # noqa: F401 (raised here, imported from here)
from minidiff.io.files import sha256_file
from minidiff.io.loading import SD_DIFFUSERS_FILES
from minidiff.plugin.plugin import TASKS
from minidiff.plugin.files import OFFICIAL_BASE_MODEL, find_plugins

HF = "https://huggingface.co"
# Official Diff-Plugin weights live in the code repository itself (pre-trained/<task>/...); pinned to the
# commit the reference notes were taken at.
DIFF_PLUGIN = "https://github.com/yuhaoliu7456/Diff-Plugin/raw/79e12bb46e01b498215fb385ce88099c75b2a7e5"


@dataclass(frozen=True)
class RemoteFile:
    path: str  # destination, relative to the checkpoints folder
    url: str
    size: int | None = None  # bytes, when published
    sha256: str | None = None  # hex digest, when published


@dataclass(frozen=True)
class Checkpoint:
    path: str  # what the loaders are given (a file or a folder), relative to the checkpoints folder
    description: str
    files: tuple


def _plugin(task):
    base = f"{DIFF_PLUGIN}/pre-trained/{task}"
    return Checkpoint(f"diff-plugin/{task}",
                      f"official Diff-Plugin '{task}' Task-Plugin (SCB + TPB; CC BY-NC-SA)",
                      tuple(RemoteFile(f"diff-plugin/{task}/{name}", f"{base}/{name}")
                            for name in ("scb/config.json", "scb/diffusion_pytorch_model.bin", "tpb.pt")))


def _sd14(name):
    return RemoteFile(f"stable-diffusion-v1-4/{name}",
                      f"{HF}/CompVis/stable-diffusion-v1-4/resolve/main/{name}")


CHECKPOINTS = {
    "sd15": Checkpoint(
        "v1-5-pruned-emaonly.safetensors",
        "Stable Diffusion 1.5, EMA weights, original single file (CreativeML OpenRAIL-M)",
        (RemoteFile("v1-5-pruned-emaonly.safetensors",
                    f"{HF}/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/"
                    "v1-5-pruned-emaonly.safetensors",
                    4_265_146_304, "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"),)),
    "sd14": Checkpoint(
        "stable-diffusion-v1-4",
        "Stable Diffusion 1.4, diffusers folder: the base model the official plugins were trained on",
        tuple(_sd14(n) for n in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                                 "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                                 "text_encoder/config.json", "text_encoder/model.safetensors"))),
    "clip-l14": Checkpoint(
        "clip-vit-large-patch14",
        "CLIP ViT-L/14 (Hugging Face folder): the Task-Plugins' image encoder (MIT)",
        (RemoteFile("clip-vit-large-patch14/config.json",
                    f"{HF}/openai/clip-vit-large-patch14/resolve/main/config.json", 4519),
         RemoteFile("clip-vit-large-patch14/model.safetensors",
                    f"{HF}/openai/clip-vit-large-patch14/resolve/main/model.safetensors",
                    1_710_540_580, "a2bf730a0c7debf160f7a6b50b3aaf3703e7e88ac73de7a314903141db026dcb"))),
    **{f"plugin-{task}": _plugin(task) for task in TASKS},
    "selector": Checkpoint(
        "diff-plugin/plugin_selector/PromptTunner.pt",
        "official Diff-Plugin Plugin-Selector (CC BY-NC-SA)",
        (RemoteFile("diff-plugin/plugin_selector/PromptTunner.pt",
                    f"{DIFF_PLUGIN}/pre-trained/plugin_selector/PromptTunner.pt"),)),
    "clip-b32": Checkpoint(
        "ViT-B-32.pt",
        "OpenAI CLIP ViT-B/32: features of the official CLIP-FID / KID (MIT)",
        (RemoteFile("ViT-B-32.pt",
                    "https://openaipublic.azureedge.net/clip/models/"
                    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
                    353_976_522, "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"),)),
    "inception": Checkpoint(
        "pt_inception-2015-12-05-6726825d.pth",
        "pytorch-fid's FID InceptionV3 weights (Apache-2.0)",
        (RemoteFile("pt_inception-2015-12-05-6726825d.pth",
                    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                    "pt_inception-2015-12-05-6726825d.pth",
                    95_628_359, "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"),)),
}

# names `--only` also takes, standing for several keys
GROUPS = {
    "plugins": [f"plugin-{t}" for t in TASKS] + ["selector"],
    # the main job, tools/sample.py: the official plugins on the base they were trained on, SD-1.4
    "default": ["sd14", "clip-l14"] + [f"plugin-{t}" for t in TASKS] + ["selector"],
    "metrics": ["clip-b32", "inception"],
    "all": list(CHECKPOINTS),
}
# Hugging Face ids of the registry's Stable Diffusion checkpoints (what plugin metadata `base_model` says)
BASE_MODELS = {"sd14": OFFICIAL_BASE_MODEL, "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5"}


def default_checkpoint_paths(root="checkpoints"):
    """The default path of each kind of weights under the checkpoints folder `root` (as strings): sd is
    SD-1.5 (plain generation), sd14 the base the official plugins were trained on (restoration)."""
    paths = dict(sd="sd15", sd14="sd14", clip="clip-l14", selector="selector", clip_b32="clip-b32",
                 inception="inception")
    out = {name: os.path.join(root, CHECKPOINTS[key].path) for name, key in paths.items()}
    out["plugins"] = os.path.join(root, "diff-plugin")
    return out


SMALL_BASE_ID = "minidiff-small"  # the base id of minidiff's small family (its sd file's metadata "format")


def base_model_id(name, sha256=None):
    """The Hugging Face id of a Stable Diffusion checkpoint given as a path or an id, when it is one of the
    registry's (by published sha256, by file or folder name, or by id); "minidiff-small" for a file of the
    small family (tools/train_small.py writes that "format" into its metadata); otherwise `name` as given."""
    if str(name).endswith(".safetensors") and os.path.isfile(name):
        from safetensors import safe_open
        try:
            with safe_open(name, framework="pt") as f:
                if (f.metadata() or {}).get("format") == SMALL_BASE_ID:
                    return SMALL_BASE_ID
        except Exception:  # noqa: BLE001  SafetensorError or I/O: not this family's; the loaders say more
            pass
    for key, model_id in BASE_MODELS.items():
        files = CHECKPOINTS[key].files
        if sha256 is not None and len(files) == 1 and files[0].sha256 == sha256:
            return model_id
        if name in (model_id, model_id.split("/")[-1], PurePath(CHECKPOINTS[key].path).name):
            return model_id
    parts = PurePath(os.path.normpath(name)).parts
    return base_model_id(parts[-1]) if len(parts) > 1 else name


def loader_files_missing(kind, path):
    """Files a loader needs that are missing at `path` (so that a folder an interrupted download left
    behind does not count): kind sd (single file or diffusers folder), clip (file or Hugging Face folder),
    selector (file), plugins (a folder with at least one plugin; tasks are checked by find_plugins)."""
    path = str(path)
    if kind in ("selector",) or os.path.isfile(path) or not os.path.isdir(path):
        return [] if os.path.isfile(path) else [path]
    if kind == "sd":  # a diffusers folder: one weights file per part
        return [os.path.join(path, names[0]) for names in SD_DIFFUSERS_FILES.values()
                if not any(os.path.isfile(os.path.join(path, n)) for n in names)]
    if kind == "clip":
        names = ("model.safetensors", "pytorch_model.bin")
        found = any(os.path.isfile(os.path.join(path, n)) for n in names)
        return [] if found else [os.path.join(path, names[0])]
    if kind == "plugins":
        return [] if find_plugins(path) else [path]
    raise ValueError(f"unknown kind of weights {kind!r}")


def expand_keys(names):
    """Registry keys for names that are keys or GROUPS, in order, without repeats; ValueError if unknown."""
    keys = []
    for name in names:
        if name not in CHECKPOINTS and name not in GROUPS:
            known = ", ".join(list(CHECKPOINTS) + list(GROUPS))
            raise ValueError(f"unknown checkpoint {name!r}; known: {known}")
        keys += [k for k in GROUPS.get(name, [name]) if k not in keys]
    return keys


def human_size(size):
    """'4.27 GB' (decimal units, as download pages show them), or 'size unknown'."""
    if size is None:
        return "size unknown"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000


def _locate(path, ckpt):
    """Where checkpoint `ckpt` sits if `path` names it (in any folder), a folder above it or a file of it;
    else None."""
    p, c = PurePath(path).parts, PurePath(ckpt.path).parts
    if p and p[-1] == c[-1]:  # the checkpoint itself, e.g. my-plugins/derain or /data/ViT-B-32.pt
        return Path(path)
    for n in range(len(c) - 1, 0, -1):  # a folder above it, e.g. checkpoints/diff-plugin
        if len(p) >= n and p[-n:] == c[:n]:
            return Path(path, *c[n:])
    for f in ckpt.files:  # a file inside it, e.g. checkpoints/clip-vit-large-patch14/model.safetensors
        fp = PurePath(f.path).parts
        if len(fp) > len(c) and len(p) >= len(fp) and p[-len(fp):] == fp:
            return Path(*p[:len(p) - len(fp)], *c)
    return None


def missing_weights_message(paths):
    """One message for missing weight files or folders: each missing file, its size, where to get it."""
    found, unknown = {}, []  # registry key -> lines of its missing files
    for path in map(str, paths):
        matched = False
        for key, ckpt in CHECKPOINTS.items():
            where = _locate(path, ckpt)
            if where is None:
                continue
            matched = True
            for f in ckpt.files:
                full = where / PurePath(f.path).relative_to(ckpt.path) if f.path != ckpt.path else where
                line = f"    {full}  {human_size(f.size)}  <- {f.url}"
                if not full.exists() and line not in found.setdefault(key, []):
                    found[key].append(line)
        if not matched:
            unknown.append(f"  {path}: no such file or folder (not a file that tools/download.py fetches)")
    found = {key: lines for key, lines in found.items() if lines}
    text = ["missing weights:"] + unknown
    for key, lines in found.items():
        text += [f"  {CHECKPOINTS[key].description}:"] + lines
    if found:
        only = "" if set(found) == set(GROUPS["default"]) else f" --only {' '.join(found)}"
        text.append(f"get them with: python tools/download.py{only}   (what they are: checkpoints/README.md)")
    return "\n".join(text)


def _remote_url(f, base_url=None):
    """The URL to fetch: `base_url/<path>` for a mirror laid out like checkpoints/; else the registry's URL,
    with Hugging Face ones pointed at HF_ENDPOINT when it is set (as huggingface_hub does)."""
    if base_url:
        return f"{base_url.rstrip('/')}/{urllib.parse.quote(f.path)}"
    endpoint = os.environ.get("HF_ENDPOINT")
    if endpoint and f.url.startswith(HF + "/"):
        return endpoint.rstrip("/") + f.url[len(HF):]
    return f.url


def _is_huggingface(url):
    """Hugging Face hosts get HF_TOKEN: huggingface.co, hf.co, and the HF_ENDPOINT mirror if one is set."""
    host = urllib.parse.urlsplit(url).hostname or ""
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "")).hostname
    return host in ("huggingface.co", "hf.co") or host.endswith(".huggingface.co") or host == endpoint


def download_file(url, dest, size=None, sha256=None, progress=True, timeout=60, chunk=1 << 20):
    """Fetch `url` to `dest`: resume `<dest>.part` with a Range request, check size and sha256, rename.

    Raises DownloadError with one line. A failed hash check deletes the partial file (it cannot be resumed);
    any other failure keeps it, so the next run continues where this one stopped.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:  # longer than the file can be: start over
        part.unlink()
        have = 0
    h = hashlib.sha256()
    if have:  # hash what is already there, then continue the same hash over the new bytes
        with open(part, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    if size is None or have < size:
        req = urllib.request.Request(url, headers={"User-Agent": "minidiff-download/1"})
        if have:
            req.add_header("Range", f"bytes={have}-")
        token = os.environ.get("HF_TOKEN")
        if token and _is_huggingface(url):
            # unredirected: urllib does not carry it on to the storage host Hugging Face redirects to
            req.add_unredirected_header("Authorization", f"Bearer {token}")
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing left to send: the .part is already whole
                resp = None
            else:
                hint = {401: " (set HF_TOKEN, and accept the model's licence on its page)",
                        403: " (set HF_TOKEN, and accept the model's licence on its page)",
                        404: " (moved? see checkpoints/README.md)"}.get(e.code, "")
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}{hint}") from None
        except (urllib.error.URLError, OSError) as e:
            raise DownloadError(f"{url}: cannot connect ({getattr(e, 'reason', e)})") from None
        if resp is not None:
            dest.parent.mkdir(parents=True, exist_ok=True)  # only now: a failed connection leaves no folder
            with resp:
                if have and resp.status != 206:  # the server ignored the Range header: start over
                    have, h = 0, hashlib.sha256()
                length = resp.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                if size is not None and total is not None and total != size:
                    raise DownloadError(f"{url}: the server offers {total} bytes, expected {size}")
                try:
                    first = resp.read(chunk)
                except (OSError, http.client.HTTPException) as e:
                    raise DownloadError(f"{url}: connection lost ({e!r}); run again to resume") from None
                if not have and looks_like_html(first):
                    raise DownloadError(f"{url}: the server sent a web page, not the file (a login or error "
                                        "page? check the URL, --base-url or HF_TOKEN)")
                with open(part, "ab" if have else "wb") as out, \
                        tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name,
                             disable=not progress, leave=False) as bar:
                    try:
                        block = first
                        while block:
                            out.write(block)
                            h.update(block)
                            bar.update(len(block))
                            block = resp.read(chunk)
                    except (OSError, http.client.HTTPException) as e:
                        raise DownloadError(f"{url}: connection lost ({e!r}); run again to resume") from None
                if total is not None and part.stat().st_size != total:
                    raise DownloadError(f"{url}: connection closed early; run again to resume")
    got = part.stat().st_size
    if size is not None and got != size:
        raise DownloadError(f"{dest}: got {got} bytes, expected {size}; run again to resume")
    if sha256 is not None and h.hexdigest() != sha256:
        part.unlink()
        raise DownloadError(f"{dest}: sha256 {h.hexdigest()} does not match the published {sha256}; "
                            "the partial file was deleted")
    os.replace(part, dest)


def looks_like_html(data):
    """True when bytes start like an HTML page: what a mirror or a login wall sends instead of a weight file
    (no weight or config file of the registry starts with '<')."""
    head = data[:512].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml"))


def download(keys, root="checkpoints", base_url=None, progress=True, verify=False, log=print):
    """Fetch every file of the registry `keys` under `root`; return (errors, checks): one-line errors (empty:
    all is well) and {relative path: "sha256" or "size only"} saying how each present file was checked.

    Files already present with the right size are kept (and re-hashed when `verify`). Folders are made only
    when a file arrives. After a host refuses a connection, its other files are not tried (one error each).
    """
    files = [f for key in keys for f in CHECKPOINTS[key].files]
    todo = [f for f in files if not _complete(Path(root) / f.path, f, verify)]
    need = sum(max(0, (f.size or 0) - _part_size(Path(root) / f.path)) for f in todo)
    existing = Path(os.path.abspath(root))
    while not existing.exists():  # the checkpoints folder is made by the first file that arrives
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if need > free:
        return [f"{root}: {human_size(need)} to download but only {human_size(free)} free"], {}
    errors, checks, unreachable = [], {}, {}
    for f in files:
        dest = Path(root) / f.path
        how = "sha256" if f.sha256 else "size only"  # unpublished size: the one the server reported
        if f not in todo:
            log(f"ok        {dest}  ({how})")
            checks[f.path] = how
            continue
        url = _remote_url(f, base_url)
        host = urllib.parse.urlsplit(url).hostname
        if host in unreachable:
            errors.append(f"{url}: not tried ({host} could not be reached)")
            continue
        log(f"download  {dest}  ({human_size(f.size)}) from {url}")
        try:
            download_file(url, dest, f.size, f.sha256, progress=progress)
            checks[f.path] = how
        except DownloadError as e:
            errors.append(str(e))
            if "cannot connect" in str(e):
                unreachable[host] = str(e)
    return errors, checks


def _complete(dest, f, verify):
    if not dest.is_file() or (f.size is not None and dest.stat().st_size != f.size):
        return False
    if verify and f.sha256 is None:  # no published hash: at least not a web page saved under its name
        with open(dest, "rb") as fh:
            return not looks_like_html(fh.read(512))
    return not (verify and f.sha256 is not None and sha256_file(dest) != f.sha256)


def _part_size(dest):
    part = dest.with_name(dest.name + ".part")
    return part.stat().st_size if part.exists() else 0
