"""The public data sets the examples use, and `routetune data fetch` to get them.

Each set is read from its public upstream at a fixed commit and checked against the SHA-256
digests of the files the examples and the published results were made with, then moved into
place under the data root (``$ROUTETUNE_DATA``, else ``~/.cache/routetune/data``) in one rename:
a fetch that fails or is interrupted leaves nothing half-written, and a folder that is already
there is never overwritten (it is verified instead).

Written by hand rather than with ``datasets``/``huggingface_hub`` downloads: these sets live in
GitHub repositories as plain files and zip archives, not on the hub, and the examples read them
as files. Only the standard library is used, so ``routetune data`` starts at once.
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.client
import io
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from routetune.errors import DataError, RoutetuneError

GITHUB = "https://raw.githubusercontent.com"


@dataclass(frozen=True)
class DataSet:
    """A folder of the data root. ``files`` maps a relative path to (URL, sha256); a set packed in
    a zip archive gives ``archive`` (URL, member prefix), the member ``patterns`` kept, and one
    ``tree`` digest over the kept files (:func:`tree_digest`)."""

    name: str
    what: str
    licence: str
    files: dict[str, tuple[str, str]] = field(default_factory=dict)
    archive: tuple[str, str] | None = None
    patterns: tuple[str, ...] = ()
    tree: str = ""

    def urls(self) -> list[str]:
        return [self.archive[0]] if self.archive else [url for url, _ in self.files.values()]


def _github(repo: str, commit: str, folder: str, digests: dict[str, str]) -> dict[str, tuple[str, str]]:
    return {name: (f"{GITHUB}/{repo}/{commit}/{folder}{name}", digest) for name, digest in digests.items()}


_NLTK = "nltk/nltk_data/5db857e6f7df11eabb5e5665836db9ec8df07e28/packages/corpora"

CATALOG: dict[str, DataSet] = {d.name: d for d in [
    DataSet("wnut17", "WNUT-17 emerging-entity NER (train 3,394 / dev 1,009 / test 1,287 sentences)", "CC BY 4.0",
            _github("leondz/emerging_entities_17", "e52a2d2a71ac1a051ca2d532eef28653c5c02603", "", {
                "wnut17train.conll": "731820e13f71af324c6b55a1575ec2ce59fbaa2a0806f8f0400b98d56cd6a7a5",
                "emerging.dev.conll": "e053b752b8155113ca66e7db08af5f2f5f43ab993694e4774f1ec5bad42312d8",
                "emerging.test.annotated": "2aa79b764e56ec9264a1b30fdd9b70195bd00ff400b62edd8f399d5f13c178f0",
                "emerging.test.conll": "d28fad9efb7a676ee95b939804aba92f60fa87ff33eebcdf46f60f26c65d0d93",
                "README.md": "7dba67f5d6f7789af3b36af9cbea54b73705f86df100002ae202a9c2f5750157"})),
    DataSet("wikitext-2-raw", "WikiText-2 raw, test split (held-out general English)", "CC BY-SA 3.0 / GFDL",
            _github("Tylogi/TyloQuant", "7989d038b13ca737da11a95fb90e77ae059f33c0", "data/wikitext-2-raw/", {
                "wiki.test.raw": "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"})),
    DataSet("tinyshakespeare", "Tiny Shakespeare (1.1 MB of dialogue)", "public domain",
            _github("karpathy/char-rnn", "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e", "data/tinyshakespeare/", {
                "input.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"})),
    DataSet("gutenberg", "12 public-domain English novels from Project Gutenberg", "public domain (US)",
            _github("denten-bin/gutenberg-shell-scripts", "1bfef4b7f350101e02624a64706feac458bd6026",
                    "test-corpus/", {
                        "105.txt": "5b128ef30ecab0a4057a62c0d4cd8e1b943fb53e9612c5af14c387a59dfe518d",
                        "1342-0.txt": "4fff6f740cc4cb3ff8d35d811e24f8799d80c73292c63e6692976f079951008d",
                        "158-0.txt": "c4ea0917919a8950f14dc3c082de3641608cd29fba5e213a3b2634089f8505e2",
                        "244-0.txt": "af0f6c590ca3901b3f61d5b90acac1ac16abc83e50b8541c9f17aff079829d96",
                        "766-0.txt": "405d8997c6c5047c6b3ceb5ad1388bd2d30aa78598952744e23a23cea7100e6b",
                        "MANIFEST.csv": "7e66e248512778e4ec2577530c66aba4845e43ce179924fa3ee196b099e91289",
                        "pg1260.txt": "c0da6a6d0e71350d064ce95a6ae150b0b5337a6acac57c5e617867136c101c97",
                        "pg174.txt": "9c38d91f7e64cdae52113a2cda33dcd06ceaf6752734fc9113547df96ea630b3",
                        "pg2097.txt": "c911f016ceff2265cfc9d9636f1818b2d767bfcadd60833a343017f16d15eaf6",
                        "pg345.txt": "cffe55838a878a29da82a0e10b2909b7e46b6f7167ed7f815782465573e98f27",
                        "pg42.txt": "55b5235679b74b5615f9153e8e2de2b32e570aecfd021808280597301a9f7704",
                        "pg730.txt": "dc29567373319c85588558cfd445dda4600889872c41b0de53610c71a7b36bc1",
                        "pg768.txt": "e3fa5893fce1d37b5349bc8126202193b68b87db257e1b70871b3a415c6fd17c"})),
    DataSet("sentence_polarity", "Pang & Lee sentence polarity v1.0 (5,331 + 5,331 sentences)", "CC BY 4.0",
            archive=(f"{GITHUB}/{_NLTK}/sentence_polarity.zip", "sentence_polarity/"), patterns=("rt-polarity.*",),
            tree="68af45a0f8db01cd6bafa9331e2dff0f34c60589e75445b70c2a64eec8c68c19"),
    DataSet("movie_reviews", "Pang & Lee polarity v2.0 (1,000 + 1,000 review documents)", "CC BY 4.0",
            archive=(f"{GITHUB}/{_NLTK}/movie_reviews.zip", "movie_reviews/"), patterns=("pos/*.txt", "neg/*.txt"),
            tree="41f274866bdf3a416af3e721fcf9d0f3ccf4df0b8db96e787cf11d79551ea293"),
    DataSet("inaugural", "US presidential inaugural addresses 1789-2009", "public domain",
            archive=(f"{GITHUB}/{_NLTK}/inaugural.zip", "inaugural/"), patterns=("*.txt",),
            tree="851d38f95b7e7df6f259c9ab58d4bf544b6fe7fcee5f4777fa09b294f19097d8"),
]}


def data_root() -> Path:
    """Where the examples read data sets from: ``$ROUTETUNE_DATA``, else ``~/.cache/routetune/data``."""
    return Path(os.environ.get("ROUTETUNE_DATA") or "~/.cache/routetune/data").expanduser()


def hint(path: str | Path) -> str:
    """For a missing data path inside a catalogued set's folder: how to get it, else ''."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        folder = Path(*parts[:i + 1])
        if part in CATALOG and not folder.exists():
            root = folder.parent
            where = "" if root == data_root() else f" --root {root}"
            return f" (the public {part} data set is not there yet: routetune data fetch {part}{where})"
    return ""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree_digest(folder: Path, patterns: tuple[str, ...]) -> tuple[str, int]:
    """SHA-256 over the sorted lines ``relative/path<TAB>sha256`` of the files matching patterns."""
    files = sorted({p for pat in patterns for p in folder.glob(pat) if p.is_file()})
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(folder).as_posix()}\t{_sha256(p.read_bytes())}\n".encode())
    return h.hexdigest(), len(files)


def problems(ds: DataSet, folder: Path) -> list[str]:
    """What differs between a folder and the set (missing files, wrong digests); empty when it verifies."""
    if ds.archive:
        digest, n = tree_digest(folder, ds.patterns)
        return [] if digest == ds.tree else [f"{n} files matching {', '.join(ds.patterns)} do not match the published "
                                              "digest (a file is missing, extra or changed)"]
    out = []
    for name, (_, digest) in ds.files.items():
        path = folder / name
        if not path.is_file():
            out.append(f"{name} is missing")
        elif _sha256(path.read_bytes()) != digest:
            out.append(f"{name} has a different SHA-256 than the published file")
    return out


def _download(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (fixed https URLs)
        return response.read()


def _unpack(ds: DataSet, blob: bytes, into: Path) -> None:
    prefix = ds.archive[1]
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        for member in zf.namelist():
            rel = member[len(prefix):] if member.startswith(prefix) else None
            if rel and not member.endswith("/") and any(fnmatch.fnmatch(rel, p) for p in ds.patterns):
                if ".." in Path(rel).parts:
                    raise DataError(f"unsafe member path {member!r}", ds.archive[0])
                (into / rel).parent.mkdir(parents=True, exist_ok=True)
                (into / rel).write_bytes(zf.read(member))


def _fill(ds: DataSet, into: Path, source: Path | None, timeout: float) -> None:
    """Put the set's files into the empty folder ``into``, from ``source`` (a local copy) or upstream."""
    if source is not None:
        base = source / ds.name if (source / ds.name).is_dir() else source
        if ds.archive:
            for pat in ds.patterns:
                for p in base.glob(pat):
                    (into / p.relative_to(base)).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(p, into / p.relative_to(base))
        else:
            for name in ds.files:
                if (base / name).is_file():
                    shutil.copyfile(base / name, into / name)
        return
    try:
        if ds.archive:
            _unpack(ds, _download(ds.archive[0], timeout), into)
        for name, (url, _) in ds.files.items():
            (into / name).write_bytes(_download(url, timeout))
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise RoutetuneError(
            f"data fetch {ds.name}: cannot download ({reason}); offline, download {' '.join(ds.urls())} "
            f"elsewhere and run `routetune data fetch {ds.name} --from FOLDER` with the files in FOLDER") from None


def fetch(name: str, root: Path | None = None, source: Path | None = None, timeout: float = 60.0) -> tuple[Path, str]:
    """Fetch one set into the data root; returns (folder, 'fetched' | 'present'). A folder already
    there is verified and left as it is; one that does not verify is reported, never replaced."""
    if name not in CATALOG:
        raise RoutetuneError(f"data fetch: unknown data set {name!r} (known: {', '.join(CATALOG)})")
    ds, root = CATALOG[name], (root or data_root())
    folder = root / name
    if folder.exists():
        found = problems(ds, folder)
        if found:
            raise DataError(f"is already there but does not match the published {name} ({found[0]}); "
                            "it was left as it is: move it away to fetch again", folder)
        return folder, "present"
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=root))  # same file system: one rename
    try:
        _fill(ds, staging, source, timeout)
        found = problems(ds, staging)
        if found:
            origin = source or "the download"
            raise DataError(f"{found[0]}; nothing was written to {folder}", origin)
        staging.rename(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)  # our own staging folder, never the user's
    return folder, "fetched"
