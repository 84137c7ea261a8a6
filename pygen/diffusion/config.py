"""diffusers' scheduler configuration format, without diffusers.

A scheduler's constructor keywords are its *config*; diffusers stores them in a folder as
``scheduler_config.json``::

    {"_class_name": "DDIMScheduler", "_diffusers_version": "0.42.1", "beta_end": 0.012, ...}

:class:`ConfigMixin` gives pygen's schedulers diffusers' config API on that format, so that a
scheduler folder written by either library loads into the other:

- ``config``: a :class:`FrozenConfig` (a read-only ordered dict with attribute access, like
  diffusers' ``FrozenDict``); ``register_to_config(**kw)`` replaces it with an updated copy.
- ``from_config(config, return_unused_kwargs=False, **overrides)``: keys the class takes go to
  its constructor (``overrides`` win); every other key of ``config`` (``_class_name``,
  ``_diffusers_version``, options of other schedulers, unknown keys) is kept in the new
  scheduler's config (and written back by ``save_config``), as diffusers does. Keys listed in
  ``_deprecated_kwargs`` are passed to the constructor too; deprecated *values* (e.g. DPM-Solver's
  ``solver_type="logrho"``) are mapped by the constructor to their replacement
  (``_deprecated_values``), as diffusers' constructors do.
- ``load_config(dir_or_file, subfolder=None)``, ``from_pretrained(dir, subfolder=None, **overrides)``:
  local folders only (pygen does not download; pass a folder from ``huggingface_hub.snapshot_download``).
- ``save_config(dir)`` / ``save_pretrained(dir)``: written atomically (:func:`pygen._io.write_atomic`);
  ``_class_name`` is the pygen class's name, which is also diffusers' name for the same scheduler.
- ``compatibles``: the pygen schedulers a config of this class can be loaded into.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

from pygen._io import write_atomic

__all__ = ["CONFIG_NAME", "DIFFUSERS_FORMAT_VERSION", "FrozenConfig", "ConfigMixin"]

CONFIG_NAME = "scheduler_config.json"
#: the ``_diffusers_version`` written by ``save_config``: the diffusers release whose
#: scheduler options and defaults pygen's schedulers follow (and are tested against)
DIFFUSERS_FORMAT_VERSION = "0.42.1"


class FrozenConfig(OrderedDict):
    """A read-only ordered dict whose keys are also attributes (diffusers' ``FrozenDict``)."""

    _frozen = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._frozen = True

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}") from None

    def _refuse(self, *args, **kwargs):
        raise TypeError(f"a {type(self).__name__} is read-only: use register_to_config(**kw) on its owner")

    __delitem__ = pop = popitem = setdefault = update = clear = _refuse

    def __setitem__(self, key, value):
        if self._frozen:
            self._refuse()
        super().__setitem__(key, value)

    def __setattr__(self, name, value):
        if self._frozen:
            self._refuse()
        super().__setattr__(name, value)

    def __reduce__(self):  # pickling / deepcopy rebuild from the items
        return (type(self), (list(self.items()),))

    def __copy__(self):
        return type(self)(self.items())

    def __deepcopy__(self, memo):
        import copy

        return type(self)([(k, copy.deepcopy(v, memo)) for k, v in self.items()])


def _jsonable(v: Any) -> Any:
    """Config values as JSON values: tensors and arrays become lists, paths strings."""
    if hasattr(v, "tolist") and callable(v.tolist):  # torch.Tensor, numpy array or scalar
        return v.tolist()
    if isinstance(v, Path):
        return v.as_posix()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if hasattr(v, "to_dict") and callable(v.to_dict):
        return v.to_dict()
    return v


class ConfigMixin:
    """diffusers' config API for pygen's schedulers (see the module doc)."""

    config_name = CONFIG_NAME
    #: names of pygen.diffusion classes whose configs this class can load (its own included)
    _compatibles: tuple[str, ...] = ()
    #: constructor keywords that from_config passes on even though they are deprecated
    _deprecated_kwargs: tuple[str, ...] = ()
    #: {option: {deprecated value: replacement}}, applied by the constructor
    _deprecated_values: dict[str, dict[Any, Any]] = {}
    #: constructor keywords that are not recorded in the config
    ignore_for_config: tuple[str, ...] = ()
    has_compatibles = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wraps each subclass's ``__init__`` to note which keywords the caller passed, so that the
        config records the others in ``_use_default_values``, as diffusers' ``register_to_config``
        decorator does (``from_config`` then lets a compatible class use its own defaults there)."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_pygen_notes_passed", False):
            return
        names = [n for n in inspect.signature(init).parameters][1:]

        @functools.wraps(init)
        def __init__(self, *args: Any, **kw: Any) -> None:
            outer = "_init_passed" not in self.__dict__
            if outer:
                self.__dict__["_init_passed"] = set(names[: len(args)]) | set(kw)
            try:
                init(self, *args, **kw)
            finally:
                if outer:
                    self.__dict__.pop("_init_passed", None)

        __init__._pygen_notes_passed = True
        cls.__init__ = __init__

    def _note_defaults(self, keys) -> None:
        """Record in ``_use_default_values`` the constructor keywords among ``keys`` that the caller
        did not pass (call it from the constructor, after registering the config)."""
        passed = self.__dict__.get("_init_passed")
        if passed is None:
            return
        defaults = [k for k in keys if k not in passed and not k.startswith("_")]
        if defaults:
            self.register_to_config(_use_default_values=defaults)

    def __getattr__(self, name: str) -> Any:
        """A config entry read as an attribute (``scheduler.beta_start``) works with a FutureWarning,
        as in diffusers; anything else raises diffusers' AttributeError."""
        d = self.__dict__.get("_internal_dict")
        if d is not None and name in d and not name.startswith("__"):
            warnings.warn(
                f"Accessing config attribute `{name}` directly via '{type(self).__name__}' object attribute is "
                f"deprecated. Please access '{name}' over '{type(self).__name__}'s config object instead, "
                f"e.g. 'scheduler.config.{name}'.",
                FutureWarning,
                stacklevel=2,
            )
            return d[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    # ---- the config itself ------------------------------------------------------------------

    @property
    def config(self) -> FrozenConfig:
        return self.__dict__.get("_internal_dict", FrozenConfig())

    def register_to_config(self, **kwargs: Any) -> None:
        """Add or replace config entries (the config stays read-only in between)."""
        kwargs.pop("kwargs", None)
        self._internal_dict = FrozenConfig({**self.config, **kwargs})

    @classmethod
    def _get_init_keys(cls, klass=None) -> set[str]:
        params = inspect.signature((klass or cls).__init__).parameters
        return {k for k, p in params.items() if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    @classmethod
    def _map_deprecated_values(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        out = dict(kwargs)
        for key, table in cls._deprecated_values.items():
            v = out.get(key)
            if isinstance(v, str) and v in table:
                out[key] = table[v]
        return out

    # ---- compatibles ----------------------------------------------------------------------

    @classmethod
    def _get_compatibles(cls) -> list[type]:
        import pygen.diffusion as D

        names = dict.fromkeys([cls.__name__, *cls._compatibles])
        return [getattr(D, n) for n in names if isinstance(getattr(D, n, None), type)]

    @property
    def compatibles(self) -> list[type]:
        """The pygen schedulers this one's config can be loaded into (``X.from_config(s.config)``)."""
        return self._get_compatibles()

    # ---- from a config ------------------------------------------------------------------------

    @classmethod
    def extract_init_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """Split a config into (constructor keywords, unused keywords, hidden entries), as diffusers does.

        Hidden entries are the config's keys that the constructor does not take; they are kept
        in the new scheduler's config so that a save / load round trip loses nothing."""
        used_defaults = config_dict.get("_use_default_values", [])
        config_dict = {k: v for k, v in dict(config_dict).items() if k not in used_defaults and k != "_use_default_values"}
        original = dict(config_dict)
        expected = cls._get_init_keys() - set(cls.ignore_for_config)
        # options of compatible schedulers are not "unexpected": they stay hidden, silently
        others: set[str] = set()
        for c in cls._get_compatibles():
            others |= cls._get_init_keys(c)
        config_dict = {k: v for k, v in config_dict.items() if k not in others - expected}
        config_dict = {k: v for k, v in config_dict.items() if not k.startswith("_")}
        init: dict[str, Any] = {}
        for key in expected:
            if key in kwargs:
                config_dict.pop(key, None)
                init[key] = kwargs.pop(key)
            elif key in config_dict:
                init[key] = config_dict.pop(key)
        unused = {**config_dict, **kwargs}
        hidden = {k: v for k, v in original.items() if k not in init}
        return init, unused, hidden

    @classmethod
    def from_config(cls, config: dict[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """A scheduler of this class from a config dict (a diffusers or pygen scheduler's ``config``,
        or a loaded ``scheduler_config.json``); ``kwargs`` override its entries."""
        if config is None:
            raise ValueError("from_config needs a config dict as its first argument")
        if not isinstance(config, dict):
            raise TypeError(
                f"from_config takes a config dict, got {type(config).__name__}; to load a folder use {cls.__name__}.from_pretrained"
            )
        init, unused, hidden = cls.extract_init_dict(config, **kwargs)
        for k in cls._deprecated_kwargs:
            if k in unused:
                init[k] = unused.pop(k)
        obj = cls(**init)
        if "_class_name" in hidden:
            hidden["_class_name"] = cls.__name__
        if hidden:
            obj.register_to_config(**hidden)
        unused = {**unused, **hidden}
        return (obj, unused) if return_unused_kwargs else obj

    # ---- files ---------------------------------------------------------------------------------

    @classmethod
    def _config_file(cls, path: str | os.PathLike, subfolder: str | None = None) -> Path:
        p = Path(path)
        if subfolder:
            p = p / subfolder
        if p.is_file():
            return p
        if p.is_dir():
            f = p / cls.config_name
            if not f.is_file():
                raise FileNotFoundError(f"{p} has no {cls.config_name}")
            return f
        raise FileNotFoundError(
            f"{p} is not a local folder or file; pygen reads local folders only "
            "(download one first, e.g. huggingface_hub.snapshot_download(repo_id))"
        )

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                    return_unused_kwargs: bool = False, **kwargs: Any):
        """The config dict of a folder's (or a file's) ``scheduler_config.json``."""
        f = cls._config_file(pretrained_model_name_or_path, subfolder)
        try:
            config = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise OSError(f"{f} is not a valid JSON file: {e}") from e
        if not isinstance(config, dict):
            raise OSError(f"{f} does not hold a JSON object")
        return (config, kwargs) if return_unused_kwargs else config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        return_unused_kwargs: bool = False, **kwargs: Any):
        """A scheduler from a folder holding ``scheduler_config.json`` (``subfolder="scheduler"`` for
        a pipeline's folder); ``kwargs`` override config entries."""
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder)
        for k in ("cache_dir", "force_download", "local_files_only", "token", "revision", "proxies"):
            kwargs.pop(k, None)  # hub options: meaningless for a local folder
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def to_json_string(self) -> str:
        d = dict(self.config)
        d["_class_name"] = type(self).__name__
        d["_diffusers_version"] = DIFFUSERS_FORMAT_VERSION  # diffusers too writes its own version
        d = {k: _jsonable(v) for k, v in d.items()}
        for k in ("_ignore_files", "_use_default_values"):
            d.pop(k, None)
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        text = self.to_json_string()
        write_atomic(json_file_path, lambda f: f.write(text), "w")

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write ``save_directory/scheduler_config.json`` (atomically: a reader sees the old file or the new one)."""
        if push_to_hub:
            raise NotImplementedError("pygen does not upload; push the folder with huggingface_hub")
        d = Path(save_directory)
        if d.is_file():
            raise AssertionError(f"Provided path ({d}) should be a directory, not a file")
        d.mkdir(parents=True, exist_ok=True)
        # as diffusers: saving records the class name and format version in the live config too
        self.register_to_config(_class_name=type(self).__name__, _diffusers_version=DIFFUSERS_FORMAT_VERSION)
        self.to_json_file(d / self.config_name)

    save_pretrained = save_config

