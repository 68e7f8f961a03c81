"""Concept files in other tools' formats: read any supported file or folder, export to theirs.

Readers: ``discover`` finds the importable units under a path (a file; a concept folder holding
``learned_embeds.*``, whose diffusers ``learned_embeds-steps-N.*`` checkpoints are skipped; any
other folder, searched recursively) and what it skipped; ``load_source`` reads one unit,
``load_any`` every unit under a path. Formats: conceptlib files; diffusers
``learned_embeds.safetensors`` and ``learned_embeds.bin``; sd-concepts-library folders;
AUTOMATIC1111 ``.pt`` (zip and legacy pickle, never executed) and embedding images
(``a1111_image``); single-tensor ``.safetensors`` such as kohya's ``emb_params``. SDXL two-encoder files are refused. Writers (``export``): conceptlib,
diffusers, a1111, sd-concepts, kohya (``EXPORT_FORMATS``).
"""

from __future__ import annotations

from conceptlib.formats.readers import Source, discover, load_any, load_source
from conceptlib.formats.writers import EXPORT_FORMATS, export

__all__ = ["EXPORT_FORMATS", "Source", "discover", "export", "load_any", "load_source"]
