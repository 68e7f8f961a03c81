"""Template packs: the prompts a concept is trained with.

A pack is a list of prompt templates with a ``{token}`` placeholder (where the concept's token
goes) and, for images that come with a caption (``photo.txt`` beside ``photo.png``), a list of
caption templates that also hold a ``{caption}`` placeholder.

Packs are found through the ``conceptlib.template_packs`` entry-point group (see
conceptlib.plugins); this module provides the built-in ``object``, ``style`` and ``group`` packs,
the first and last taken from the keras.io textual-inversion example.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from conceptlib.errors import PluginError

TOKEN = "{token}"
CAPTION = "{caption}"


@dataclass(frozen=True)
class TemplatePack:
    """A named list of prompt templates.

    ``templates`` each contain ``{token}``; ``caption_templates`` each contain ``{token}`` and
    ``{caption}`` and are used for images that have a caption file.
    """

    name: str
    description: str
    templates: tuple[str, ...]
    caption_templates: tuple[str, ...] = ("a photo of a {token}, {caption}",)
    source: str = field(default="builtin", compare=False)

    def __post_init__(self) -> None:
        if not self.templates:
            raise PluginError(f"template pack {self.name!r} has no templates; give it at least one")
        for template in self.templates:
            if TOKEN not in template:
                raise PluginError(
                    f"template pack {self.name!r}: template {template!r} lacks the {TOKEN} placeholder"
                )
        for template in self.caption_templates:
            if TOKEN not in template or CAPTION not in template:
                raise PluginError(
                    f"template pack {self.name!r}: caption template {template!r} needs both "
                    f"{TOKEN} and {CAPTION}"
                )

    def render(self, index: int, token: str, caption: str | None = None) -> str:
        """The prompt for template number ``index`` (taken modulo the list length).

        A caption that itself contains ``{token}`` is used as the whole prompt.
        """
        if caption:
            if TOKEN in caption:
                return caption.replace(TOKEN, token)
            template = self.caption_templates[index % len(self.caption_templates)]
            return template.replace(CAPTION, caption).replace(TOKEN, token)
        return self.templates[index % len(self.templates)].replace(TOKEN, token)

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


def coerce_packs(obj, source: str) -> list[TemplatePack]:
    """Turn what a template-pack entry point gives into TemplatePacks.

    Accepted: a TemplatePack, an iterable of them, a callable returning either, or a dict
    ``{name: [template, ...]}``.
    """
    if callable(obj) and not isinstance(obj, TemplatePack):
        obj = obj()
    if isinstance(obj, TemplatePack):
        obj = [obj]
    if isinstance(obj, dict):
        obj = [TemplatePack(str(name), "", tuple(templates)) for name, templates in obj.items()]
    packs = []
    for pack in obj:
        if not isinstance(pack, TemplatePack):
            raise PluginError(f"{source}: gave {type(pack).__name__}, expected TemplatePack objects")
        packs.append(TemplatePack(pack.name, pack.description, pack.templates, pack.caption_templates, source))
    return packs
