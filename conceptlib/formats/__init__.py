"""Concept files in other tools' formats: read any supported file or folder, export to theirs.

Readers (``load_any`` / ``load_source``): conceptlib files; diffusers ``learned_embeds.safetensors``
and ``learned_embeds.bin``; sd-concepts-library folders; AUTOMATIC1111 ``.pt`` (zip and legacy
pickle); single-tensor ``.safetensors`` such as kohya's ``emb_params``. SDXL two-encoder files are
refused. Writers (``export``): conceptlib, diffusers, a1111, sd-concepts, kohya.
"""

from __future__ import annotations

from conceptlib.formats.readers import Source, discover, load_any, load_source
from conceptlib.formats.writers import EXPORT_FORMATS, export

__all__ = ["EXPORT_FORMATS", "Source", "discover", "export", "load_any", "load_source"]
