"""Hugging Face's ``kernels`` package (which transformers 5 imports) works from the repository root, where
``python -c`` and ``python -m`` put this project's own ``kernels/`` folder first on sys.path (lane
downstream: .venv-cuda has transformers and kernels)."""
import pytest

from tests.test_packaging import ROOT, run_python

pytest.importorskip("transformers")
pytest.importorskip("kernels")
pytestmark = pytest.mark.downstream


def test_hugging_face_kernels_imports_from_the_repository_root():
    result = run_python("import kernels; kernels.CUDAProperties; print(kernels.__file__)", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "site-packages" in result.stdout


def test_an_export_loads_into_transformers_from_the_repository_root(tmp_path):
    from simmim_fast import build_simmim, get_config
    from simmim_fast.checkpoint import save_atomic
    from simmim_fast.downstream.export import export_checkpoint

    checkpoint = tmp_path / "vit-tiny.pth"
    save_atomic({"model": build_simmim("vit-tiny").state_dict(), "config": get_config("vit-tiny").to_dict()},
                checkpoint)
    export_checkpoint(str(checkpoint), "transformers", str(tmp_path / "hf"))
    result = run_python(f"from transformers import BeitModel; BeitModel.from_pretrained({str(tmp_path / 'hf')!r})",
                        cwd=ROOT)
    assert result.returncode == 0, result.stderr
