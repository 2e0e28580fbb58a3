"""transformers' Auto classes (and so ``pipeline(...)``) for pruned checkpoints, opt-in.

A pruned transformers checkpoint says ``model_type = "hf_prune_<base type>"`` so that plain
transformers refuses it instead of building the unpruned architecture. :func:`register_auto_classes`
(public as ``hf_prune.enable_pipeline()``) teaches this process's transformers those types:
``AutoConfig`` resolves them to the base config class as :func:`~hf_prune.hub.base.mark_pruned`
makes it, and the vision Auto model classes to a loader that goes through
:class:`~hf_prune.hub.AutoPrunedModel` (strict loading, the structure spec applied). Then

    import hf_prune
    hf_prune.enable_pipeline()
    pipe = transformers.pipeline("image-classification", model="me/vit-pruned")

works. It is a call, not an import side effect, because it imports transformers and the vision
config modules (~0.3 s, plus timm's import for ``timm_wrapper``): ``import hf_prune`` stays cheap.
Checkpoints saved with ``standalone=True`` need none of this: ``trust_remote_code=True`` loads
their own code, and that code wins over these registrations.
"""
from __future__ import annotations

__all__ = ["register_auto_classes", "enable_pipeline", "VISION_AUTO_CLASSES"]

from .base import VISION_AUTO_CLASSES
_REGISTERED: set[str] = set()
_LOADERS: dict[str, type] = {}


class PrunedAutoLoader:
    """What an Auto class calls for a ``hf_prune_<type>`` config: loading goes through AutoPrunedModel.

    Subclassed once per Auto class (``auto_class``, ``mapping_name``); never instantiated.
    """

    auto_class = ""
    mapping_name = ""

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} only loads: use {self.auto_class}.from_pretrained(...)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        from .io import AutoPrunedModel

        if model_args:
            raise TypeError(f"pruned checkpoints take no positional model arguments, got {model_args!r}")
        config = kwargs.get("config")
        if config is not None:
            cls._check_architecture(config, pretrained_model_name_or_path)
        return AutoPrunedModel.from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        """A pruned model of ``config``'s structure with fresh weights (``AutoModel....from_config``)."""
        import transformers

        from .base import mark_pruned
        from .io import pruned_model_class

        cls._check_architecture(config, "this config")
        base = getattr(transformers, config.hf_prune["base"]["architecture"])
        model = pruned_model_class(base)._from_config(config, **kwargs)
        model.__class__ = base  # as AutoPrunedModel returns it: an ordinary model of pruned shape
        mark_pruned(model.config)
        return model

    from_config = _from_config

    @classmethod
    def _check_architecture(cls, config, where) -> None:
        from transformers.models.auto import modeling_auto

        from .base import base_config_class

        spec = getattr(config, "hf_prune", None)
        if not isinstance(spec, dict) or not isinstance(spec.get("base"), dict):
            raise ValueError(f"{where} has model_type {config.model_type!r} but no 'hf_prune' structure spec in its "
                             "config; it is not a checkpoint hf_prune wrote")
        saved = spec["base"].get("architecture")
        names = getattr(modeling_auto, cls.mapping_name).get(base_config_class(config).model_type, ())
        names = (names,) if isinstance(names, str) else tuple(names)
        if saved not in names:
            raise ValueError(f"{where} holds a pruned {saved}; {cls.auto_class} would need {' or '.join(names)}, which "
                             f"is not what was pruned and saved. Load it with the Auto class for {saved} or with "
                             "hf_prune.AutoPrunedModel.from_pretrained")


def _loader(auto_class: str, mapping_name: str) -> type:
    if auto_class not in _LOADERS:
        _LOADERS[auto_class] = type(f"HfPrune{auto_class}Loader", (PrunedAutoLoader,), {
            "auto_class": auto_class, "mapping_name": mapping_name, "__module__": __name__,
            "__doc__": f"Loads pruned checkpoints for transformers.{auto_class} (see hf_prune.hub.auto)."})
    return _LOADERS[auto_class]


def register_auto_classes(model_types=None) -> list[str]:
    """Register ``hf_prune_<type>`` with ``AutoConfig`` and the vision Auto model classes; returns the new types.

    ``model_types``: base model types (``"vit"``, ``"convnext"``, ``"timm_wrapper"``, ...) to
    register; default: every type a vision Auto class (image classification, backbone,
    segmentation, detection, depth, masked image modelling) knows, and ``AutoModel`` for those.
    Idempotent; affects this process only.
    """
    import transformers
    from transformers.models.auto import configuration_auto, modeling_auto

    from .base import pruned_config_class

    mappings = [(auto, getattr(modeling_auto, name, {}), name) for auto, name in VISION_AUTO_CLASSES]
    vision = {t for auto, mapping, _ in mappings if auto != "AutoModel" for t in mapping}
    wanted = sorted(vision if model_types is None else ({model_types} if isinstance(model_types, str)
                                                        else set(model_types)))
    unknown = [t for t in wanted if t not in configuration_auto.CONFIG_MAPPING_NAMES]
    if unknown:
        raise ValueError(f"model_types {unknown} are not model types of transformers {transformers.__version__}; "
                         "pass base types such as 'vit' or 'timm_wrapper'")
    added = []
    for model_type in wanted:
        if model_type in _REGISTERED:
            continue
        try:
            base = configuration_auto.CONFIG_MAPPING[model_type]
        except Exception:  # noqa: BLE001  (a config whose optional backend is missing: nothing to load there)
            continue
        config_cls = pruned_config_class(base)
        transformers.AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        for auto, mapping, name in mappings:
            if model_type in mapping:
                getattr(transformers, auto).register(config_cls, _loader(auto, name), exist_ok=True)
        _REGISTERED.add(model_type)
        added.append(config_cls.model_type)
    return added


def enable_pipeline(model_types=None) -> list[str]:
    """Let ``transformers.pipeline(...)`` and the Auto classes load pruned checkpoints in this process.

    Same as :func:`register_auto_classes`; returns the ``hf_prune_<type>`` model types it added.
    """
    return register_auto_classes(model_types)
