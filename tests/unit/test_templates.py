from pathlib import Path

import pytest

from zimage_split.client.templates import (
    ENV_DIR,
    PACKAGED_DIR,
    TemplateError,
    apply_template,
    list_templates,
    load_template,
    template_dirs,
)

PACKAGED = {"anime", "cinematic", "illustration", "photo", "portrait", "product"}


@pytest.fixture(autouse=True)
def no_user_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_DIR, raising=False)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_packaged_templates_list_and_apply() -> None:
    templates = list_templates()
    assert [t.name for t in templates] == sorted(PACKAGED)
    for template in templates:
        assert template.description and "\n" not in template.description
        assert template.path.parent == PACKAGED_DIR
        applied = template.apply("a red fox in the snow")
        assert "a red fox in the snow" in applied and "{prompt}" not in applied and "#" not in applied
    assert apply_template("photo", "a red fox").startswith("A high-resolution photograph of a red fox.")


def test_no_template_leaves_the_prompt_alone() -> None:
    assert apply_template(None, "a {prompt} with braces") == "a {prompt} with braces"


def test_braces_and_the_prompt_are_kept_literally(tmp_path: Path) -> None:
    path = write(tmp_path, "json", '# JSON-ish\n{ "style": {x} }, {prompt}!\n\n')
    assert apply_template(str(path), "a {prompt} of {0}") == '{ "style": {x} }, a {prompt} of {0}!'


def test_user_dir_adds_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "photo", "# My photo\nShot on film: {prompt}")
    write(tmp_path, "watercolor", "# Watercolor painting\r\nA watercolor of {prompt}.\r\n")
    (tmp_path / "notes.md").write_text("not a template")
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    assert template_dirs() == [PACKAGED_DIR, tmp_path]
    templates = {t.name: t for t in list_templates()}
    assert set(templates) == PACKAGED | {"watercolor"}
    assert templates["photo"].description == "My photo" and templates["photo"].path == tmp_path / "photo.txt"
    assert apply_template("photo", "a fox") == "Shot on film: a fox"
    assert templates["watercolor"].description == "Watercolor painting"
    assert apply_template("watercolor", "a fox") == "A watercolor of a fox."


def test_missing_user_dir_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "missing"))
    with pytest.raises(TemplateError, match="is not a folder"):
        list_templates()


def test_a_path_to_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, "mine", "# Mine\nA sketch of {prompt}")
    template = load_template(str(path))
    assert (template.name, template.description, template.path) == ("mine", "Mine", path)
    assert apply_template(str(path), "a cat") == "A sketch of a cat"
    with pytest.raises(TemplateError, match="No template file at"):
        load_template(str(tmp_path / "absent.txt"))


def test_unknown_names_list_the_available_ones() -> None:
    with pytest.raises(TemplateError, match="Unknown template 'noir'; available: anime, cinematic") as error:
        apply_template("noir", "a fox")
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("# Twice\n{prompt} and {prompt}", "exactly once.*found 2"),
        ("# None\nno placeholder here", "exactly once.*found 0"),
        ("# Only in the description {prompt}\nbody", "exactly once.*found 0"),
        ("No description\n{prompt}", "must start with a line '# <one-line description>'"),
    ],
)
def test_malformed_templates_name_the_file(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, "broken", text)
    with pytest.raises(TemplateError, match=problem) as error:
        load_template(str(path))
    assert str(path) in str(error.value)
