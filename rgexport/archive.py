"""Bundle archives: a bundle .zip extracted without letting any member leave its folder."""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath

from rgexport.errors import RgexportError

BUNDLE_MANIFEST = "bundle.json"


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extracts a bundle .zip into `dest`, refusing any member whose path would leave it; returns the
    bundle folder."""
    try:
        z = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as e:
        raise RgexportError(f"{archive} is not a zip archive: {e}") from None
    root = dest.resolve()
    with z:
        for info in z.infolist():
            name = info.filename
            target = (dest / name).resolve()
            if name.startswith(("/", "\\")) or ".." in PurePosixPath(name.replace("\\", "/")).parts \
                    or not target.is_relative_to(root):
                raise RgexportError(f"{archive}: member {name!r} would be written outside the bundle; refusing")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise RgexportError(f"{archive}: member {name!r} is a symbolic link; refusing")
        z.extractall(dest)
    found = [p.parent for p in dest.rglob(BUNDLE_MANIFEST)]
    if len(found) != 1:
        raise RgexportError(f"{archive} holds {len(found)} {BUNDLE_MANIFEST} files, expected one bundle")
    return found[0]
