"""lib/utils/errors.py: every library error names the module's file."""
import pytest

from lib.utils.errors import ModuleErrors, module_path


def test_module_errors_name_the_file_and_keep_the_class():
    err = ModuleErrors("lib.model.query")
    assert err.where == "lib/model/query.py"
    e = err("chunk must be >= 1, got 0")
    assert type(e) is ValueError and str(e) == "lib/model/query.py: chunk must be >= 1, got 0"
    e = err("file x.npz does not exist", FileNotFoundError)
    assert type(e) is FileNotFoundError and str(e) == "lib/model/query.py: file x.npz does not exist"


def test_a_module_raises_through_it():
    from lib.render.camera import check_res

    with pytest.raises(ValueError, match=r"^lib/render/camera\.py: res must be a positive int"):
        check_res(0)


@pytest.mark.parametrize("name", ["", "__main__"])
def test_script_names_are_refused(name):
    with pytest.raises(ValueError, match="module's dotted name"):
        module_path(name)
