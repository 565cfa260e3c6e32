"""Reading a config: a YAML file or a bundled recipe (configs/*.yaml), plus dotted `key=value`
overrides merged by OmegaConf, validated into the typed sections of `config.py`. Every mistake is
one line (an unknown key names the closest valid one; a key given twice in a file is refused)."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Optional

import yaml
from pydantic import BaseModel, ValidationError

from stillroom.config import CodistillRunConfig, Config
from stillroom.errors import UserError

RECIPES = Path(__file__).parent / "configs"


def _suggest(model_cls, loc) -> str:
    """For an unknown key at `loc`, name the closest valid key in the same section."""
    cls = model_cls
    for part in loc[:-1]:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return ""
        cls = field.annotation
    close = difflib.get_close_matches(str(loc[-1]), list(cls.model_fields), n=1, cutoff=0.5)
    prefix = ".".join(map(str, loc[:-1]))
    if close:
        return f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)"
    return f" (valid keys: {', '.join(cls.model_fields)})"


def validate(raw: dict, cls=Config):
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        key = ".".join(str(x) for x in loc if x != "[key]") or "config"   # pydantic marks a bad dict key so
        if err["type"] == "extra_forbidden":
            hint = {("peers",): " (a co-distillation config: run `stillroom codistill`)",
                    ("codistill",): " (a co-distillation config: run `stillroom codistill`)",
                    ("student",): " (co-distillation trains `peers:`, a list of student specs with names; "
                                  "for one student run `stillroom distill`)"}.get(loc)
            if hint and cls in (Config, CodistillRunConfig):
                raise UserError(f"unknown config key '{key}'{hint}") from None
            raise UserError(f"unknown config key '{key}'{_suggest(cls, loc)}") from None
        own = (err.get("ctx") or {}).get("error")
        if isinstance(own, UserError):   # a validator's own one-line message (a ValueError, so pydantic wrapped it)
            raise UserError(str(own)) from None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "value_error" or not loc:
            raise UserError(f"config: {msg}") from None
        got = err.get("input")
        raise UserError(f"config key '{key}': {msg} (got {got!r})") from None


def resolve_recipe(name: str) -> Path:
    """A path to a YAML file, or the name of a bundled recipe (`soft` -> configs/soft.yaml)."""
    p = Path(name)
    if p.is_file():
        return p
    bundled = RECIPES / f"{name.removesuffix('.yaml')}.yaml"
    if not p.suffix and bundled.is_file():
        return bundled
    names = ", ".join(sorted(f.stem for f in RECIPES.glob("*.yaml")))
    raise UserError(f"config file not found: {name} (bundled recipes: {names})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is an error: PyYAML keeps the last
    silently, so a pasted or mistyped line (a second `max_steps:`) would change the run unseen."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1}): keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def is_config_path(arg: str) -> bool:
    """Is a command's first argument a config file or recipe (and not a key=value override)? A
    path may hold '=' (`runs/lr=1e-4/config.yaml`): an existing file, a .yaml/.yml name or no
    '=' at all is a config."""
    return "=" not in arg or arg.endswith((".yaml", ".yml")) or Path(arg).is_file()


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = (), cls=Config):
    """YAML file (or bundled recipe name) + dotted `key=value` overrides -> validated config."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    raw = {}
    if path:
        f = resolve_recipe(path)
        try:
            raw = yaml.load(f.read_text(encoding="utf-8-sig"), Loader=_UniqueKeyLoader) or {}
        except UnicodeDecodeError:
            raise UserError(f"config file {f} is not UTF-8 text (a YAML file is expected)") from None
        except yaml.YAMLError as e:
            raise UserError(f"config file {f} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {f} must be a mapping of sections (teacher:, data:, ...)")
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like key=value, e.g. train.lr=1e-4")
    conf = OmegaConf.create(raw)
    for item in overrides:
        try:
            key, value = item.split("=", 1)
            # Parsed as YAML by OmegaConf (1e-4 is a float, null is None, [a,b] a list);
            # update() also reaches into lists: peers.1.num_layers=2.
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]))["v"]
            OmegaConf.update(conf, key, parsed, force_add=True)
        except (OmegaConfBaseException, yaml.YAMLError) as e:   # the value is parsed as YAML
            raise UserError(f"override '{item}': {(str(e).splitlines() or ['cannot parse'])[0]}") from None
    try:
        raw = OmegaConf.to_container(conf, resolve=True)
    except OmegaConfBaseException as e:
        raise UserError(f"config: {str(e).splitlines()[0]}") from None
    return validate(raw, cls)


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
