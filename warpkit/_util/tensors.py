"""The one check that two models hold the same tensors: same names, same shapes.

Models are given as `{name: shape}` mappings (a state dict's tensors, safetensors headers, a layout's
state), so the check costs nothing and works before any weight is read.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

__all__ = ["check_same_tensors", "tensor_mismatch"]


def tensor_mismatch(
    reference: Mapping[str, Sequence[int]],
    other: Mapping[str, Sequence[int]],
    *,
    ignore: Collection[str] = (),
) -> str | None:
    """None when `other` has exactly the tensors of `reference` with the same shapes, else what differs
    (up to five names of each kind), phrased to follow "<other> and <reference> ..."."""
    missing = sorted(set(reference) - set(other) - set(ignore))
    extra = sorted(set(other) - set(reference) - set(ignore))
    if missing or extra:
        return f"have different tensors: missing tensors {missing[:5]}, extra tensors {extra[:5]}"
    shapes = [
        f"{n} {tuple(other[n])} vs {tuple(reference[n])}"
        for n in reference
        if n not in ignore and tuple(other[n]) != tuple(reference[n])
    ]
    if shapes:
        return f"differ in shape (name, shape, reference shape): {shapes[:5]}"
    return None


def check_same_tensors(
    reference: Mapping[str, Sequence[int]],
    other: Mapping[str, Sequence[int]],
    other_name: str,
    reference_name: str,
    *,
    ignore: Collection[str] = (),
    fix: str = "",
) -> None:
    """ValueError "<other_name> and <reference_name> have different tensors / differ in shape ... <fix>"."""
    why = tensor_mismatch(reference, other, ignore=ignore)
    if why is not None:
        raise ValueError(f"{other_name} and {reference_name} {why}." + (f" {fix}" if fix else ""))
