"""Template packs: the prompts a concept is trained with.

A pack is a list of prompt templates with a ``{token}`` placeholder (where the concept's token
goes) and, for images that come with a caption (``photo.txt`` beside ``photo.png``), a list of
caption templates that also hold a ``{caption}`` placeholder.

Packs are found through the ``conceptlib.template_packs`` entry-point group (see
conceptlib.plugins); this module provides the built-in ``object``, ``style`` and ``group`` packs,
the first and last taken from the keras.io textual-inversion example. A plain text file of
templates is a pack too (``pack_from_file``), in AUTOMATIC1111's template-file syntax.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from conceptlib.errors import PluginError, TrainingError

TOKEN = "{token}"
CAPTION = "{caption}"
# AUTOMATIC1111's textual_inversion_templates/*.txt placeholders.
_A1111_PLACEHOLDERS = {"[name]": TOKEN, "[filewords]": CAPTION}


@dataclass(frozen=True)
class TemplatePack:
    """A named list of prompt templates.

    ``templates`` each contain ``{token}`` (and no ``{caption}``); ``caption_templates`` are used
    for images that have a caption (none, the default: captions are not used and every image gets
    ``templates``): each contains ``{token}``, and ``{caption}`` where the caption goes (a template
    without it leaves the caption out, as AUTOMATIC1111's template lines without ``[filewords]``
    do; at least one must hold it).
    """

    name: str
    description: str
    templates: tuple[str, ...]
    caption_templates: tuple[str, ...] = ()
    source: str = field(default="builtin", compare=False)
    text: str | None = field(default=None, compare=False, repr=False)  # a template file's text

    def __post_init__(self) -> None:
        if not self.templates:
            raise PluginError(f"template pack {self.name!r} has no templates; give it at least one")
        for kind, templates in (("template", self.templates), ("caption template", self.caption_templates)):
            if isinstance(templates, str):
                raise PluginError(f"template pack {self.name!r}: its {kind}s are one string; give a list of strings")
            for template in templates:
                if not isinstance(template, str):
                    raise PluginError(
                        f"template pack {self.name!r}: {kind} {template!r} is not a string "
                        f"({type(template).__name__})"
                    )
                if TOKEN not in template:
                    raise PluginError(
                        f"template pack {self.name!r}: {kind} {template!r} lacks the {TOKEN} placeholder"
                    )
        for template in self.templates:
            if CAPTION in template:
                raise PluginError(
                    f"template pack {self.name!r}: template {template!r} holds {CAPTION}, which images without "
                    "a caption would train on literally; put it in the pack's caption_templates"
                )
        if self.caption_templates and not any(CAPTION in template for template in self.caption_templates):
            raise PluginError(
                f"template pack {self.name!r}: no caption template holds {CAPTION}, so captions would never "
                "be used; add it where the caption goes"
            )

    def render(self, index: int, token: str, caption: str | None = None) -> str:
        """The prompt for template number ``index`` (taken modulo the list length).

        A caption that itself contains ``{token}`` is used as the whole prompt.
        """
        if caption and self.caption_templates:
            if TOKEN in caption:
                return caption.replace(TOKEN, token)
            template = self.caption_templates[index % len(self.caption_templates)]
            return template.replace(CAPTION, caption).replace(TOKEN, token)
        return self.templates[index % len(self.templates)].replace(TOKEN, token)

    def count(self, caption: str | None) -> int:
        """How many prompts ``render`` makes for an image with this caption (or none)."""
        return len(self.caption_templates if caption and self.caption_templates else self.templates)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "templates": list(self.templates),
            "caption_templates": list(self.caption_templates),
        }


_OBJECT = (
    "a photo of a {token}",
    "a rendering of a {token}",
    "a cropped photo of the {token}",
    "the photo of a {token}",
    "a photo of a clean {token}",
    "a photo of a dirty {token}",
    "a dark photo of the {token}",
    "a photo of my {token}",
    "a photo of the cool {token}",
    "a close-up photo of a {token}",
    "a bright photo of the {token}",
    "a cropped photo of a {token}",
    "a photo of the {token}",
    "a good photo of the {token}",
    "a photo of one {token}",
    "a close-up photo of the {token}",
    "a rendition of the {token}",
    "a photo of the clean {token}",
    "a rendition of a {token}",
    "a photo of a nice {token}",
    "a good photo of a {token}",
    "a photo of the nice {token}",
    "a photo of the small {token}",
    "a photo of the weird {token}",
    "a photo of the large {token}",
    "a photo of a cool {token}",
    "a photo of a small {token}",
)

_GROUP = tuple(t.replace("{token}", "group of {token}") for t in _OBJECT)

_STYLE = (
    "a painting in the style of {token}",
    "a rendering in the style of {token}",
    "a cropped painting in the style of {token}",
    "the painting in the style of {token}",
    "a clean painting in the style of {token}",
    "a dirty painting in the style of {token}",
    "a dark painting in the style of {token}",
    "a picture in the style of {token}",
    "a cool painting in the style of {token}",
    "a close-up painting in the style of {token}",
    "a bright painting in the style of {token}",
    "a good painting in the style of {token}",
    "a close-up painting in the style of {token}",
    "a rendition in the style of {token}",
    "a nice painting in the style of {token}",
    "a small painting in the style of {token}",
    "a weird painting in the style of {token}",
    "a large painting in the style of {token}",
)


def builtin_packs() -> list[TemplatePack]:
    """The packs registered by conceptlib itself (entry point ``builtin``)."""
    return [
        TemplatePack(
            "object",
            "a thing or a character: 'a photo of a {token}' and 26 variations (keras.io example)",
            _OBJECT,
            caption_templates=("a photo of a {token}, {caption}",),
        ),
        TemplatePack(
            "style",
            "an artistic style: 'a painting in the style of {token}' and variations",
            _STYLE,
            caption_templates=("{caption}, in the style of {token}",),
        ),
        TemplatePack(
            "group",
            "several instances of a thing: 'a photo of a group of {token}' (keras.io example)",
            _GROUP,
            caption_templates=("a photo of a group of {token}, {caption}",),
        ),
    ]


def read_template_file(path: str | Path) -> tuple[Path, str]:
    """(absolute path, text) of a template file; TrainingError naming it if it cannot be read."""
    path = Path(path).expanduser().absolute()
    try:
        return path, path.read_text(encoding="utf-8-sig")  # -sig: Windows editors' byte-order mark
    except FileNotFoundError:
        raise TrainingError(f"template file {path} does not exist; give a file of templates or a pack name "
                            "(`conceptlib templates list`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainingError(f"template file {path} cannot be read ({exc}); save it as UTF-8 text") from None


def pack_from_file(path: str | Path) -> TemplatePack:
    """A pack from a UTF-8 text file of templates, one per line (blank lines skipped), with
    ``{token}`` and ``{caption}`` or AUTOMATIC1111's ``[name]`` and ``[filewords]``: an AUTOMATIC1111
    ``textual_inversion_templates/*.txt`` file works as it is. Images without a caption use every
    line, its caption placeholder left out; images with one use every line too, as AUTOMATIC1111
    does (the caption where a line holds the placeholder); a file without the placeholder ignores
    captions. TrainingError names the file (and line) that cannot be used."""
    return pack_from_text(*read_template_file(path))


def pack_from_text(path: Path, text: str) -> TemplatePack:
    """``pack_from_file`` for the ``text`` of the template file ``path`` (e.g. the copy a training
    run keeps, so ``--resume`` uses the templates the run started with)."""
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        for placeholder, ours in _A1111_PLACEHOLDERS.items():
            line = line.replace(placeholder, ours)
        if not line:
            continue
        if TOKEN not in line:
            raise TrainingError(
                f"template file {path}, line {number} ({raw.strip()!r}): no [name] or {TOKEN}, so the concept's "
                "token would not be in that prompt; add it or delete the line"
            )
        lines.append(line)
    if not lines:
        raise TrainingError(f"template file {path} holds no templates; write one per line, e.g. 'a photo of a [name]'")
    return TemplatePack(
        name=f"file:{path.name}",
        description=f"{len(lines)} templates from {path}",
        templates=tuple(dict.fromkeys(_without_caption(line) for line in lines)),
        caption_templates=tuple(lines) if any(CAPTION in line for line in lines) else (),
        source=str(path),
        text=text,
    )


def _without_caption(line: str) -> str:
    """A template with its caption placeholder left out, and the separators around it tidied:
    'a photo of a {token}, {caption}' -> 'a photo of a {token}'."""
    line = line.replace(CAPTION, "")
    line = re.sub(r"\s*,(\s*,)+", ",", line)
    line = re.sub(r"\s+", " ", line)
    return line.strip(" ,")


def coerce_packs(obj, source: str) -> list[TemplatePack]:
    """Turn what a template-pack entry point gives into TemplatePacks.

    Accepted: a TemplatePack, a list (or other iterable) of them, a callable returning either, or
    a dict ``{name: [template, ...]}``. PluginError says what is wrong with anything else.
    """
    if callable(obj) and not isinstance(obj, TemplatePack):
        obj = obj()
    if isinstance(obj, TemplatePack):
        obj = [obj]
    if isinstance(obj, dict):
        obj = [TemplatePack(str(name), "", tuple(templates) if not isinstance(templates, str) else templates)
               for name, templates in obj.items()]
    if isinstance(obj, (str, bytes)) or not hasattr(obj, "__iter__"):
        raise PluginError(f"{source}: gave {type(obj).__name__}, expected TemplatePack objects "
                          "or a dict {pack name: [template, ...]}")
    packs: dict[str, TemplatePack] = {}
    for pack in obj:
        if not isinstance(pack, TemplatePack):
            raise PluginError(f"{source}: gave {type(pack).__name__}, expected TemplatePack objects")
        if pack.name in packs:
            raise PluginError(f"{source}: gave two packs named {pack.name!r}; rename one")
        packs[pack.name] = TemplatePack(pack.name, pack.description, pack.templates, pack.caption_templates, source)
    return list(packs.values())
