"""mkdocs hook: the pages show the repository's figures/ folder without a copy of it.

A page links a figure as it lies in the repository (``../figures/x.png`` from ``docs/``), so the
link also works where the Markdown is read as files. At build time the hook adds every file of
``figures/`` to the site as ``figures/<name>`` and rewrites such links to that location.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "figures"
_LINK = re.compile(r"(\]\()([^)\s]+)")


def on_files(files, config):
    for path in sorted(FIGURES.glob("*.png")):
        files.append(File(f"figures/{path.name}", src_dir=str(ROOT), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files


def on_page_markdown(markdown, page, config, files):
    here = posixpath.dirname(page.file.src_uri)  # the page's folder inside docs/

    def fix(m: re.Match) -> str:
        target = m.group(2)
        in_repo = posixpath.normpath(posixpath.join("docs", here, target))
        if not in_repo.startswith("figures/"):
            return m.group(0)
        return m.group(1) + posixpath.relpath(in_repo, here or ".")

    return _LINK.sub(fix, markdown)
