"""Finding a model's streamable block lists from attribute paths."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .errors import StreamingError


def find_blocks(model: nn.Module, paths: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The blocks of a model in execution order, with their dotted names.

    Args:
        model: the model.
        paths: attribute paths of `nn.ModuleList`s in execution order, e.g. ("double_blocks",
            "single_blocks") or ("model.language_model.layers",). None reads the model's
            `streamable_blocks` class attribute.

    Returns:
        (name, block) pairs such as ("double_blocks.0", <module>).
    """
    if paths is None:
        paths = getattr(model, "streamable_blocks", None)
        if paths is None:
            raise StreamingError(
                f"{type(model).__name__} does not declare `streamable_blocks`: pass blocks=(...) with the "
                "attribute paths of its block lists in execution order, e.g. ('layers',)."
            )
    if isinstance(paths, str):
        paths = (paths,)
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for path in paths:
        obj: object = model
        for part in path.split("."):
            if not hasattr(obj, part):
                raise StreamingError(
                    f"{type(model).__name__} has no attribute path {path!r} (missing {part!r}): check the "
                    "block list names given to the streamer."
                )
            obj = getattr(obj, part)
        if not isinstance(obj, (nn.ModuleList, nn.Sequential)):
            raise StreamingError(
                f"{path!r} on {type(model).__name__} is a {type(obj).__name__}, not an nn.ModuleList: "
                "name the list that holds the blocks."
            )
        for i, block in enumerate(obj):
            if id(block) in seen:
                raise StreamingError(f"block {path}.{i} appears twice in the block lists {tuple(paths)}.")
            seen.add(id(block))
            out.append((f"{path}.{i}", block))
    if not out:
        raise StreamingError(f"the block lists {tuple(paths)} of {type(model).__name__} are empty.")
    return out
