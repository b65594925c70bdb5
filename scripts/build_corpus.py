"""Build the licence-clean English text corpus under ``calibration/corpus/``.

The corpus is extracted from the Python 3.11 HTML documentation shipped by the Debian
package ``python3.11-doc`` (``apt-get install -y python3.11-doc``), which installs the
Sphinx-built pages under ``/usr/share/doc/python3.11/html``.  Only the standard library
is used.

Extraction (one HTML page = one document):

* only the main content (``<div class="body" role="main">``) is read; navigation bars,
  sidebars, headers/footers, search forms, ``<script>``/``<style>``, local tables of
  contents (``<nav>``), toctree link lists and the pilcrow permalinks are dropped;
* every block element (paragraph, heading, list item, definition term/body, table row,
  caption, ...) becomes one line with its whitespace collapsed to single spaces; table
  cells of a row are joined with ``" | "``;
* code blocks (``<pre>``) keep their line structure and indentation (tabs expanded,
  trailing spaces and empty lines dropped), one code line per line;
* text is NFC-normalised; documents are separated by one blank line, so no document
  contains an empty line.

Pages that are not prose (the general/module indexes, search page, full table of
contents, front page, download page, and the copyright/licence pages, which also carry
third-party licence texts) are skipped.

Split (by document, never by line): every document gets the key
``sha256(f"{salt}:{relative_path}")``; documents are visited in key order and each goes
to the first of calibration, heldout, train whose byte budget it still fits in (else it
is left out).  Each output file lists its documents in sorted path order.  The split
(document paths per file), the Debian package version, the licence and the sha256 of
each output are written to ``calibration/sources.json``.

Rebuild with the defaults (from the repository root)::

    python3 scripts/build_corpus.py
"""

from __future__ import annotations

import argparse
import hashlib
import html
import html.parser
import json
import re
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HTML_ROOT = Path("/usr/share/doc/python3.11/html")
DEFAULT_COPYRIGHT = Path("/usr/share/doc/python3.11-doc/copyright")
PACKAGE = "python3.11-doc"
DEFAULT_SALT = "rgexport-corpus-v1"

# Top-level pages that are indexes, navigation or licence boilerplate rather than prose.
EXCLUDED_PAGES = frozenset(
    {
        "contents.html",
        "copyright.html",
        "download.html",
        "genindex.html",
        "index.html",
        "license.html",
        "py-modindex.html",
        "search.html",
    }
)
EXCLUDED_PATTERNS = (re.compile(r"^genindex-.*\.html$"),)

# Elements whose whole subtree is dropped.
SKIP_TAGS = frozenset({"script", "style", "nav", "form", "svg", "button", "select", "textarea", "noscript"})
SKIP_CLASSES = frozenset({"headerlink", "toctree-wrapper", "sphinxsidebar", "related", "footer"})
VOID_TAGS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
)
# Elements that start/end a line of output.
BLOCK_TAGS = frozenset(
    {
        "address", "article", "aside", "blockquote", "caption", "dd", "details", "div", "dl", "dt",
        "figcaption", "figure", "footer", "h1", "h2", "h3", "h4", "h5", "h6", "header", "li", "main",
        "ol", "p", "section", "summary", "table", "tbody", "thead", "tfoot", "ul",
    }
)  # fmt: skip
CELL_TAGS = frozenset({"td", "th"})
CELL_SEPARATOR = " | "


def _is_main(tag: str, attrs: dict[str, str]) -> bool:
    return tag == "div" and attrs.get("role") == "main"


def _skipped(tag: str, attrs: dict[str, str]) -> bool:
    if tag in SKIP_TAGS:
        return True
    classes = set(attrs.get("class", "").split())
    return bool(classes & SKIP_CLASSES)


def _collapse(text: str) -> str:
    return " ".join(text.split())


class DocExtractor(html.parser.HTMLParser):
    """Collects the main-content text of one Sphinx page as a list of lines."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self._buf: list[str] = []
        self._stack: list[str] = []  # open non-void tags inside the main content
        self._in_main = False
        self._skip_depth = 0  # >0 while inside a dropped subtree (counts its open tags)
        self._pre_depth = 0
        self._row_depth = 0
        self._row_cells: list[str] = []

    # -- line assembly -------------------------------------------------------------------
    def _flush(self) -> None:
        text = _collapse("".join(self._buf))
        self._buf = []
        if not text:
            return
        if self._row_depth:
            self._row_cells.append(text)
        else:
            self.lines.append(text)

    def _flush_cell(self) -> None:
        self._flush()

    def _flush_row(self) -> None:
        self._flush()
        cells = [c for c in self._row_cells if c]
        self._row_cells = []
        if cells:
            self.lines.append(CELL_SEPARATOR.join(cells))

    def _flush_pre(self) -> None:
        raw = "".join(self._buf)
        self._buf = []
        for line in raw.split("\n"):
            line = line.expandtabs(8).rstrip()
            line = "".join(ch for ch in line if ch == " " or not unicodedata.category(ch).startswith("C"))
            if line.strip():
                if self._row_depth:
                    self._row_cells.append(_collapse(line))
                else:
                    self.lines.append(line)

    # -- parser callbacks ----------------------------------------------------------------
    def handle_starttag(self, tag: str, attrs_list: list[tuple[str, str | None]]) -> None:
        attrs = {k: (v or "") for k, v in attrs_list}
        if not self._in_main:
            if _is_main(tag, attrs):
                self._in_main = True
                self._stack = [tag]
            return
        if tag in VOID_TAGS:
            if tag == "br" and not self._skip_depth:
                self._buf.append("\n" if self._pre_depth else " ")
            return
        self._stack.append(tag)
        if self._skip_depth:
            self._skip_depth += 1
            return
        if _skipped(tag, attrs):
            self._skip_depth = 1
            return
        if tag == "pre":
            self._flush()
            self._pre_depth += 1
        elif tag == "tr":
            self._flush()
            self._row_depth += 1
            self._row_cells = []
        elif tag in CELL_TAGS or (tag in BLOCK_TAGS and not self._pre_depth):
            self._flush()

    def handle_startendtag(self, tag: str, attrs_list: list[tuple[str, str | None]]) -> None:
        # Self-closing syntax (<br />, <hr />): never opens a subtree.
        if self._in_main and not self._skip_depth and tag == "br":
            self._buf.append("\n" if self._pre_depth else " ")

    def handle_endtag(self, tag: str) -> None:
        if not self._in_main or tag in VOID_TAGS:
            return
        # Tolerate unbalanced markup: close up to the matching open tag, if any.
        if tag not in self._stack:
            return
        while self._stack:
            top = self._stack.pop()
            self._close(top)
            if top == tag:
                break
        if not self._stack:
            self._flush()
            self._in_main = False

    def _close(self, tag: str) -> None:
        if self._skip_depth:
            self._skip_depth -= 1
            return
        if tag == "pre":
            self._pre_depth -= 1
            if not self._pre_depth:
                self._flush_pre()
        elif tag in CELL_TAGS:
            self._flush_cell()
        elif tag == "tr":
            self._flush_row()
            self._row_depth -= 1
        elif tag in BLOCK_TAGS and not self._pre_depth:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._in_main and not self._skip_depth:
            self._buf.append(data)

    def close(self) -> None:
        super().close()
        if self._buf:
            self._flush()


def extract_text(html_text: str) -> str:
    """Return the main-content text of one page: one paragraph (or code line) per line."""
    parser = DocExtractor()
    parser.feed(html_text)
    parser.close()
    lines = [unicodedata.normalize("NFC", line) for line in parser.lines]
    return "\n".join(line for line in lines if line.strip())


def is_excluded(rel: str) -> bool:
    if rel in EXCLUDED_PAGES:
        return True
    name = rel.rsplit("/", 1)[-1]
    return any(p.match(name) for p in EXCLUDED_PATTERNS)


def list_pages(html_root: Path) -> list[str]:
    """Relative paths (POSIX, sorted) of the HTML pages that are candidate documents."""
    pages = []
    for path in html_root.rglob("*.html"):
        rel = path.relative_to(html_root).as_posix()
        if rel.startswith("_") or is_excluded(rel):
            continue
        pages.append(rel)
    return sorted(pages)


@dataclass
class Document:
    path: str
    text: str

    @property
    def nbytes(self) -> int:
        return len(self.text.encode("utf-8"))

    def key(self, salt: str) -> str:
        return hashlib.sha256(f"{salt}:{self.path}".encode()).hexdigest()


def split_documents(
    docs: list[Document], budgets: dict[str, int], salt: str
) -> tuple[dict[str, list[Document]], list[Document]]:
    """Assign whole documents to splits greedily in hash-key order; returns (splits, unused)."""
    splits: dict[str, list[Document]] = {name: [] for name in budgets}
    used = dict.fromkeys(budgets, 0)
    unused: list[Document] = []
    for doc in sorted(docs, key=lambda d: d.key(salt)):
        cost = doc.nbytes + 2  # the text plus its separating blank line
        for name, budget in budgets.items():
            if used[name] + cost <= budget:
                splits[name].append(doc)
                used[name] += cost
                break
        else:
            unused.append(doc)
    for members in splits.values():
        members.sort(key=lambda d: d.path)
    return splits, sorted(unused, key=lambda d: d.path)


def render(docs: list[Document]) -> bytes:
    return ("\n\n".join(d.text for d in docs) + "\n").encode("utf-8")


def dpkg_field(package: str, field: str) -> str:
    out = subprocess.run(
        ["dpkg-query", "-W", f"-f=${{{field}}}", package], check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def os_release() -> str:
    path = Path("/etc/os-release")
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    return "unknown"


def file_facts(path: Path, base: Path) -> dict[str, object]:
    data = path.read_bytes()
    return {
        "path": path.relative_to(base).as_posix(),
        "bytes": len(data),
        "lines": data.count(b"\n"),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


PSF_HEADING = "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2"
ZERO_BSD_HEADING = "ZERO-CLAUSE BSD LICENSE FOR CODE IN THE PYTHON"


def _tag_text(fragment: str) -> str:
    return _collapse(html.unescape(re.sub(r"<[^>]+>", " ", fragment)))


def licence_facts(html_root: Path, copyright_path: Path) -> dict[str, object]:
    """Licence statements quoted from the Debian copyright file and the upstream pages."""
    facts: dict[str, object] = {
        "spdx": "PSF-2.0 AND 0BSD",
        "prose": "PSF License Agreement (Python Software Foundation License Version 2)",
        "code_examples": "Zero-Clause BSD (0BSD), in addition to the PSF License",
    }
    deb = copyright_path.read_text(encoding="utf-8")
    clause = re.search(r"^1\. This LICENSE AGREEMENT.*?(?=^\s*$)", deb, re.MULTILINE | re.DOTALL)
    facts["debian_copyright_file"] = {
        "path": str(copyright_path),
        "sha256": hashlib.sha256(deb.encode("utf-8")).hexdigest(),
        "psf_license_v2_present": PSF_HEADING in deb,
        "psf_clause_1": _collapse(clause.group(0)) if clause else None,
        "mentions_zero_clause_bsd": bool(re.search(r"zero[- ]clause|0BSD", deb, re.IGNORECASE)),
    }
    page = (html_root / "copyright.html").read_text(encoding="utf-8")
    footer = re.search(r'<div class="footer">(.*?)</div>', page, re.DOTALL)
    footer_lines = [_tag_text(x) for x in footer.group(1).split("<br />")] if footer else []
    lic = DocExtractor()
    lic.feed((html_root / "license.html").read_text(encoding="utf-8"))
    lic.close()
    zero: list[str] = []
    for i, line in enumerate(lic.lines):
        if line.startswith(ZERO_BSD_HEADING):
            grant = []
            for body in lic.lines[i + 1 :]:
                if body.startswith("THE SOFTWARE IS PROVIDED"):
                    break
                grant.append(body)
            zero = [line, _collapse(" ".join(grant))]
            break
    notice = [ln for ln in extract_text(page).splitlines() if ln.startswith("Copyright ©")]
    facts["upstream_docs"] = {
        "page_footer": [ln for ln in footer_lines if "licensed" in ln],
        "license_html_zero_clause_bsd": zero,
        "copyright_html_notice": notice,
    }
    return facts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--html-root", type=Path, default=DEFAULT_HTML_ROOT, help="Sphinx HTML tree to read")
    ap.add_argument(
        "--out-dir", type=Path, default=REPO_ROOT / "calibration" / "corpus", help="where the .txt go"
    )
    ap.add_argument(
        "--sources-json",
        type=Path,
        default=REPO_ROOT / "calibration" / "sources.json",
        help="provenance manifest to write",
    )
    ap.add_argument(
        "--copyright", type=Path, default=DEFAULT_COPYRIGHT, help="Debian copyright file of the package"
    )
    ap.add_argument("--salt", default=DEFAULT_SALT, help="salt of the per-document split hash")
    ap.add_argument("--train-bytes", type=int, default=4_000_000, help="train.txt byte cap")
    ap.add_argument("--heldout-bytes", type=int, default=200_000, help="heldout.txt byte cap")
    ap.add_argument("--calibration-bytes", type=int, default=100_000, help="calibration.txt byte cap")
    args = ap.parse_args(argv)

    html_root: Path = args.html_root
    if not html_root.is_dir():
        print(f"{html_root} not found: apt-get install -y {PACKAGE}", file=sys.stderr)
        return 1

    docs: list[Document] = []
    for rel in list_pages(html_root):
        text = extract_text((html_root / rel).read_text(encoding="utf-8"))
        if text:
            docs.append(Document(rel, text))

    # Calibration and heldout are filled first so that they are the intended sizes; train
    # takes what fits under its cap; documents that fit nowhere are left out.
    budgets = {
        "calibration": args.calibration_bytes,
        "heldout": args.heldout_bytes,
        "train": args.train_bytes,
    }
    splits, unused = split_documents(docs, budgets, args.salt)

    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    base = args.sources_json.resolve().parent.parent
    files = []
    for name in ("train", "heldout", "calibration"):
        path = out_dir / f"{name}.txt"
        path.write_bytes(render(splits[name]))
        facts = file_facts(path.resolve(), base)
        facts["documents"] = len(splits[name])
        files.append(facts)
        print(f"{facts['path']}: {facts['bytes']} bytes, {facts['lines']} lines, {len(splits[name])} docs")

    version = dpkg_field(PACKAGE, "Version")
    manifest = {
        "package": PACKAGE,
        "version": version,
        "source_package": dpkg_field(PACKAGE, "Source") or PACKAGE,
        "distribution": os_release(),
        "upstream": "Python 3.11.2 documentation (https://docs.python.org/3.11/), built with Sphinx",
        "html_root": str(html_root),
        "licence": licence_facts(html_root, args.copyright),
        "split": {
            "unit": "document (one HTML page)",
            "key": f"sha256('{args.salt}:' + path relative to html_root)",
            "rule": "visit documents in ascending key order; each goes to the first of "
            "calibration, heldout, train whose byte budget (text + 2 bytes) it still fits in, "
            "otherwise it is unused",
            "budgets_bytes": budgets,
            "excluded_pages": sorted(EXCLUDED_PAGES) + ["genindex-*.html", "_*/**"],
            "documents": {
                name: [d.path for d in splits[name]] for name in ("train", "heldout", "calibration")
            },
            "unused": [d.path for d in unused],
        },
        "files": files,
        "command": "python3 scripts/build_corpus.py",
    }
    args.sources_json.parent.mkdir(parents=True, exist_ok=True)
    args.sources_json.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    total = sum(d.nbytes for d in docs)
    print(f"{len(docs)} documents, {total} bytes extracted; {len(unused)} unused; {PACKAGE} {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
