"""Bundle archives: a bundle .zip extracted without letting any member leave its folder."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path, PurePosixPath

from rgexport.errors import RgexportError

BUNDLE_MANIFEST = "bundle.json"


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extracts a bundle .zip into `dest`, refusing any member whose path would leave it; returns the
    bundle folder."""
    if archive.suffix.lower() != ".zip":
        kind = "a tar archive" if ".tar" in archive.suffixes or archive.suffix == ".tgz" else f"a {archive.suffix} file"
        raise RgexportError(f"{archive} is {kind}, which rgexport does not read; bundles are read from their "
                            "folder or from the .zip that `rgexport build --archive` writes")
    try:
        z = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise RgexportError(f"{archive} is not a zip archive: {e}") from None
    root = dest.resolve()
    with z:
        infos = z.infolist()
        total = sum(i.file_size for i in infos)
        free = shutil.disk_usage(dest).free
        if total > free:
            raise RgexportError(f"{archive} would unpack to {total / 1e9:.1f} GB, more than the "
                                f"{free / 1e9:.1f} GB free for extracting it; refusing")
        for info in infos:
            name = info.filename
            target = (dest / name).resolve()
            if name.startswith(("/", "\\")) or ".." in PurePosixPath(name.replace("\\", "/")).parts \
                    or not target.is_relative_to(root):
                raise RgexportError(f"{archive}: member {name!r} would be written outside the bundle; refusing")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise RgexportError(f"{archive}: member {name!r} is a symbolic link; refusing")
        try:
            z.extractall(dest)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
            raise RgexportError(f"{archive} cannot be unpacked: {type(e).__name__}: {e}") from None
    found = [p.parent for p in dest.rglob(BUNDLE_MANIFEST)]
    if len(found) != 1:
        raise RgexportError(f"{archive} holds {len(found)} {BUNDLE_MANIFEST} files, expected one bundle")
    return found[0]
