"""Early, clear errors for config values of the wrong type or range.

Hydra checks that a key exists; plain YAML carries no types, so `dac.o2m.topk=abc` would otherwise
fail deep inside the assigner. These checks name the key, the bad value and what is expected.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is unusable; the message names the key and the fix."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_PRECISIONS = {"32", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64", "64-true", "transformer-engine"}

_COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")

# key -> (predicate, what is expected)
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: v is None or _is_int(v), "an integer or null"),
    "trainer.max_epochs": (lambda v: v is None or (_is_int(v) and (v > 0 or v == -1)), "a positive integer"),
    "trainer.devices": (lambda v: _is_int(v) or v == "auto" or isinstance(v, (list, str)), "an integer, a list or 'auto'"),
    "trainer.precision": (lambda v: str(v) in _PRECISIONS, f"one of {sorted(_PRECISIONS)}"),
    "trainer.gradient_clip_val": (lambda v: v is None or (_is_number(v) and v >= 0), "a number >= 0 or null"),
    "optimizer.lr": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "optimizer.weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "scheduler.step_size": (lambda v: _is_int(v) and v > 0, "a positive integer (epochs before the lr drop)"),
    "module.lr_backbone": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "module.lr_linear_proj_mult": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "module.compile": (
        lambda v: isinstance(v, bool) or (isinstance(v, str) and v in _COMPILE_BACKENDS),
        f"true, false or a torch.compile backend ({', '.join(_COMPILE_BACKENDS)})",
    ),
    "dac.enabled": (lambda v: isinstance(v, bool), "true or false"),
    "dac.c_decoder.share_layer0_self_attn": (lambda v: isinstance(v, bool), "true or false"),
    "dac.o2m.box_source": (lambda v: v in ("o_decoder", "c_decoder"), "'o_decoder' or 'c_decoder'"),
    "dac.o2m.score_weights": (
        lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(x) and x >= 0 for x in v),
        "two numbers >= 0, e.g. [0.3,0.7]",
    ),
    "dac.o2m.threshold": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "dac.o2m.topk": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "dac.o2m.low_quality_matches": (lambda v: isinstance(v, bool), "true or false"),
    "dac.o2m.max_positives": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1 or null (no cap)"),
    "dac.o2m.loss_scale": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "dac.o2m.rank_tau": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "ema.enabled": (lambda v: isinstance(v, bool), "true or false"),
    "ema.decay": (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "resume": (lambda v: isinstance(v, bool), "true or false"),
    "init_from": (lambda v: v is None or isinstance(v, str), "a checkpoint path or null"),
    "data.batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1 (images per process)"),
    "data.val_batch_size": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1 or null (= batch_size)"),
    "data.num_workers": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "data.num_train": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "data.num_val": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "data.image_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1 (pixels)"),
    "trainer.max_steps": (lambda v: _is_int(v) and (v > 0 or v == -1), "a positive integer or -1 (no limit)"),
    "ckpt_path": (lambda v: v is None or isinstance(v, str), "a checkpoint path, 'last' or null"),
}


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first key with a value of the wrong type or range."""
    for key, (ok, expected) in _CHECKS.items():
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True)
        except Exception as err:  # a missing mandatory value (???) or a broken interpolation
            raise ConfigError(f"Config key `{key}` cannot be read: {err}") from None
        if OmegaConf.select(cfg, key, default="__absent__") == "__absent__":
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        if not ok(value):
            raise ConfigError(f"Config key `{key}` is {value!r} ({type(value).__name__}); expected {expected}.")


def _accepted_arguments(target: Any) -> list[str] | None:
    """The keyword arguments ``target`` accepts, or None when it takes any (``**kwargs`` that go nowhere known).

    A class whose ``__init__`` passes ``**kwargs`` on to its base (``SyntheticCocoDataModule`` ->
    ``CocoDataModule``) accepts its own arguments plus the base's: the bases are followed until one
    takes no ``**kwargs``.
    """
    owners = [c.__init__ for c in target.__mro__ if "__init__" in vars(c)] if inspect.isclass(target) else [target]
    valid: list[str] = []
    for function in owners:
        parameters = inspect.signature(function).parameters.values()
        valid += [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return valid
    return None


def check_arguments(node: DictConfig, key: str) -> None:
    """Raise ConfigError if ``node`` (a ``_target_`` config at ``key``) sets an argument its target lacks.

    ``+trainer.max_epoch=1`` would otherwise end in a TypeError deep inside Hydra's instantiate;
    this names the closest valid argument, or lists them all.
    """
    from hydra.utils import get_object

    target = node.get("_target_")
    if not isinstance(target, str):
        return
    try:
        valid = _accepted_arguments(get_object(target))
    except Exception as err:  # noqa: BLE001 - an unknown target is the user's to fix
        raise ConfigError(f"`{key}._target_={target}` cannot be imported: {err}") from None
    if valid is None:
        return
    for name in node:
        if str(name).startswith("_") or name in valid:
            continue
        close = difflib.get_close_matches(str(name), valid, n=1)
        hint = f"did you mean `{key}.{close[0]}`?" if close else f"valid ones: {', '.join(valid)}"
        raise ConfigError(f"`{key}.{name}` is not an argument of {target}; {hint}")
