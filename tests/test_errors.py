"""lib/utils/errors.py: every library error names the module's file."""
import pytest

from lib.utils.errors import ModuleErrors, module_path


def test_module_errors_name_the_file_and_keep_the_class():
    err = ModuleErrors("lib.model.query")
    assert err.where == "lib/model/query.py"
    e = err("chunk must be >= 1, got 0")
    assert type(e) is ValueError and str(e) == "lib/model/query.py: chunk must be >= 1, got 0"
    e = err("file x.npz does not exist", FileNotFoundError)
    assert type(e) is FileNotFoundError
    assert str(e) == "lib/model/query.py: file x.npz does not exist"


def test_a_module_raises_through_it():
    from lib.render.camera import check_res

    with pytest.raises(ValueError, match=r"^lib/render/camera\.py: res must be a positive int"):
        check_res(0)


@pytest.mark.parametrize("name", ["", "__main__"])
def test_script_names_are_refused(name):
    with pytest.raises(ValueError, match="module's dotted name"):
        module_path(name)


def test_finite_vector_names_the_field():
    import numpy as np

    from lib.utils.errors import finite_vector

    def fail(msg):
        return KeyError(f"f.json: {msg}")

    np.testing.assert_array_equal(finite_vector([1, 2, 3], "x", 3, fail), [1.0, 2.0, 3.0])
    assert finite_vector(np.ones((1, 3)), "x", 3, fail, flatten=True).shape == (3,)
    for value, size, flatten, words in ([1, 2], 3, False, "x has 2 values, expected 3"),\
            (np.ones((1, 3)), 3, False, r"x has shape \(1, 3\), expected \(3,\)"),\
            ([1, np.nan, 2], 3, False, "x contains NaN or infinite values"),\
            (["a", "b"], 2, True, "x is not numeric"):
        with pytest.raises(KeyError, match=f"f.json: {words}"):
            finite_vector(value, "x", size, fail, flatten=flatten)
