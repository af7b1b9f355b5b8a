"""`module:object` specs and the one same-tensors check."""

from __future__ import annotations

import pytest

from warpkit._util.imports import import_object, is_object_spec
from warpkit._util.tensors import check_same_tensors, tensor_mismatch


def test_import_object():
    assert import_object("os.path:join", "thing") is __import__("os").path.join
    assert [is_object_spec(s) for s in ("a.b:c", "a.b", ":c", "a:", "./x:y")] == [
        True,
        False,
        False,
        False,
        True,
    ]


@pytest.mark.parametrize(
    ("spec", "kwargs", "error", "message"),
    [
        ("os.path", {}, ValueError, r"^reward 'os\.path' must be 'package\.module:function'\.$"),
        ("no_such_module_x:f", {}, ValueError, r"^reward 'no_such_module_x:f' cannot be imported: No module"),
        (
            "os:no_such_attr",
            {},
            ValueError,
            r"^reward 'os:no_such_attr' cannot be imported: module 'os' has no",
        ),
        ("os:sep", {"callable_": True}, TypeError, r"^reward 'os:sep' is not callable\.$"),
    ],
)
def test_import_object_errors(spec, kwargs, error, message):
    with pytest.raises(error, match=message):
        import_object(spec, "reward", **kwargs)


def test_tensor_mismatch_by_hand():
    ref = {"a": (2, 3), "b": (4,), "tied": (1,)}
    assert tensor_mismatch(ref, {"a": [2, 3], "b": (4,), "tied": (1,)}) is None
    assert tensor_mismatch(ref, {"a": (2, 3), "b": (4,)}, ignore={"tied"}) is None
    assert tensor_mismatch(ref, {"a": (2, 3), "c": (4,), "tied": (1,)}) == (
        "have different tensors: missing tensors ['b'], extra tensors ['c']"
    )
    assert tensor_mismatch(ref, {"a": (3, 2), "b": (4,), "tied": (1,)}) == (
        "differ in shape (name, shape, reference shape): ['a (3, 2) vs (2, 3)']"
    )
    with pytest.raises(ValueError, match=r"^model 1 and the init differ in shape .* Fix it\.$"):
        check_same_tensors(ref, {"a": (3, 2), "b": (4,), "tied": (1,)}, "model 1", "the init", fix="Fix it.")
