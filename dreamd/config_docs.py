"""The configuration's documentation, made from the field docstrings in dreamd/config.py:
docs/config.md (`config_reference`, a test keeps the committed file equal to it) and
`dreamd config --explain` (`explain`). Every field documents itself where it is defined; this
module only renders those docstrings.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, TypeAdapter

from dreamd.config import Config, Section
from dreamd.config_file import toml_value


def config_reference() -> str:
    """docs/config.md: every section and field with its default and meaning (a test keeps the
    committed file equal to this)."""
    lines = ["# Configuration reference", "",
             "Made from the field docstrings in dreamd/config.py (`dreamd config --explain` prints "
             "the same). Set a field in the TOML file under its section, or as "
             "`DREAMD_<SECTION>__<FIELD>` in the environment.", ""]
    for name, field in Config.model_fields.items():
        section = field.annotation
        if field.exclude or not (isinstance(section, type) and issubclass(section, BaseModel)):
            continue
        lines += [f"## [{name}]", ""]
        if section.__doc__ and section.__doc__.strip() != Section.__doc__.strip():
            lines += [" ".join(section.__doc__.split()), ""]
        lines += ["| field | default | meaning |", "|---|---|---|"]
        for fname, f in section.model_fields.items():
            default = json.dumps(f.default, default=str) if not isinstance(f.default, str) or len(f.default) < 60 \
                else '"' + f.default[:57] + '..."'
            doc = " ".join((f.description or "").split()).replace("|", "\\|")
            lines.append(f"| `{fname}` | `{default}` | {doc} |")
        lines.append("")
    return "\n".join(lines)


def explain(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Field docs as lines 'section.field = default  # doc', the default written as TOML (for
    `dreamd config --explain`)."""
    out: list[str] = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.append(f"[{prefix}{name}]")
            out.extend(explain(ann, prefix=f"{prefix}{name}."))
            continue
        doc = " ".join((field.description or "").split())
        if field.default is None:  # TOML has no null: an unset field is left out of the file
            out.append(f"# {prefix}{name} is unset by default  # {doc}")
        else:
            value = TypeAdapter(field.annotation).dump_python(field.default, mode="json")
            out.append(f"{prefix}{name} = {toml_value(value)}  # {doc}")
    return out
