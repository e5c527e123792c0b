"""Prompt templates: text files that wrap a prompt in a style (`--template NAME`, `zsplit templates`).

A template file is UTF-8: its first line is "# <one-line description>", and the rest, stripped of
surrounding whitespace, is the body, which holds `{prompt}` exactly once. Applying a template replaces that
`{prompt}` with the prompt; every other character, braces included, is kept as written (no format()
escaping). The packaged templates live in zimage_split/templates; a folder named by ZSPLIT_TEMPLATE_DIR
adds more, and its files override packaged ones of the same name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PLACEHOLDER = "{prompt}"
ENV_DIR = "ZSPLIT_TEMPLATE_DIR"
PACKAGED_DIR = Path(__file__).resolve().parent.parent / "templates"


class TemplateError(ValueError):
    """An unknown template name, or a template file that breaks the format; the message says the fix."""


@dataclass(frozen=True)
class Template:
    """One template file: `name` is the file name without ".txt"."""

    name: str
    description: str
    body: str
    path: Path

    def apply(self, prompt: str) -> str:
        """The body with `{prompt}` replaced by `prompt`."""
        return self.body.replace(PLACEHOLDER, prompt, 1)


def template_dirs() -> list[Path]:
    """The folders searched, lowest priority first: the packaged one, then $ZSPLIT_TEMPLATE_DIR if set."""
    dirs = [PACKAGED_DIR]
    user_dir = os.environ.get(ENV_DIR, "")
    if user_dir:
        path = Path(user_dir).expanduser()
        if not path.is_dir():
            raise TemplateError(
                f"{ENV_DIR}={user_dir!r} is not a folder; create it, point it at your templates, or unset it."
            )
        dirs.append(path)
    return dirs


def list_templates() -> list[Template]:
    """Every template by name (user templates replacing packaged ones of the same name), sorted by name."""
    return [read_template(path) for _, path in sorted(_template_files().items())]


def load_template(name_or_path: str) -> Template:
    """A template by name ("photo") or by the path of a .txt file ("./mine.txt")."""
    if name_or_path.endswith(".txt") or "/" in name_or_path or os.sep in name_or_path:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise TemplateError(f"No template file at {path}; check the path, or pass a template name.")
        return read_template(path)
    files = _template_files()
    if name_or_path not in files:
        available = ", ".join(sorted(files)) or "none"
        raise TemplateError(
            f"Unknown template {name_or_path!r}; available: {available} (`zsplit templates` describes "
            f"them). Add your own as NAME.txt in ${ENV_DIR}, or pass a path to a .txt file."
        )
    return read_template(files[name_or_path])


def apply_template(name_or_path: str | None, prompt: str) -> str:
    """`prompt` wrapped by the template `name_or_path`; None leaves the prompt unchanged."""
    if name_or_path is None:
        return prompt
    return load_template(name_or_path).apply(prompt)


def read_template(path: Path) -> Template:
    """Parses one template file; TemplateError names the file and what is wrong with it."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise TemplateError(f"Cannot read template {path}: {error}") from None
    first, _, rest = text.partition("\n")
    if not first.startswith("#"):
        raise TemplateError(
            f"Template {path} must start with a line '# <one-line description>', then the body."
        )
    body = rest.strip()
    count = body.count(PLACEHOLDER)
    if count != 1:
        raise TemplateError(
            f"Template {path} must contain {PLACEHOLDER} exactly once in its body (found {count}); that is "
            "where the prompt goes."
        )
    return Template(name=path.stem, description=first[1:].strip(), body=body, path=path)


def _template_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for folder in template_dirs():
        if folder.is_dir():
            files.update({path.stem: path for path in sorted(folder.glob("*.txt")) if path.is_file()})
    return files
