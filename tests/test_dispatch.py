import os
import subprocess
import sys

import pytest
import torch

import simmim_fast as sf
from simmim_fast import dispatch, ops
from simmim_fast.backends import ALL_OPS, Backend, registry


def loss_args():
    return dict(reconstruction=torch.randn(1, 3, 16, 16), target=torch.randn(1, 3, 16, 16),
                mask=torch.ones(1, 2, 2, dtype=torch.long), patch_size=8, in_chans=3, shuffle_stride=1)


def test_import_does_not_pull_optional_packages():
    code = ("import sys, simmim_fast; bad = [m for m in ('triton', 'xformers', 'apex', 'torch_xla') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_auto_uses_reference_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert dispatch.select("masked_l1_loss", loss_args()).name == "reference"


def test_every_backend_explains_itself():
    for op in ALL_OPS:
        for name, backend in registry().items():
            reasons = backend.reasons(op, loss_args())
            assert isinstance(reasons, list) and all(isinstance(r, str) and r for r in reasons)
            if op not in backend.ops:
                assert reasons == [f"{name} does not implement {op}"]


def test_forcing_an_unusable_backend_fails_loudly_with_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(dispatch.ENV_VAR, "xformers")
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(dispatch.BackendError, match=r"xformers.*forced for attention.*xformers\.ops is not importable"):
        ops.attention(q, q, q)
    # ops xformers does not implement at all stay on auto
    assert ops.masked_l1_loss(**loss_args()).dim() == 0


def test_spec_parsing_and_context_manager(monkeypatch):
    assert dispatch.parse_spec("triton") == ("triton", {})
    assert dispatch.parse_spec("attention=sdpa, masked_l1_loss=cuda") == (None, {"attention": "sdpa", "masked_l1_loss": "cuda"})
    assert dispatch.parse_spec("auto") == (None, {})
    with pytest.raises(dispatch.BackendError, match="unknown backend 'tritn'"):
        dispatch.parse_spec("tritn")
    with pytest.raises(dispatch.BackendError, match="unknown op 'attn'"):
        dispatch.parse_spec("attn=sdpa")
    monkeypatch.setenv(dispatch.ENV_VAR, "xformers")
    with sf.use_backend("reference"):  # innermost wins over the environment
        assert dispatch.select("attention", {"q": torch.zeros(1)}).name == "reference"
        with sf.use_backend("attention=sdpa"):
            assert dispatch.forced_backend_name("attention") == "sdpa"
            assert dispatch.forced_backend_name("masked_l1_loss") is None
    assert dispatch.forced_backend_name("attention") == "xformers"
    with pytest.raises(dispatch.BackendError):
        with sf.use_backend("nonsense"):
            pass


def test_info_prints_backends_and_choices():
    env = {k: v for k, v in os.environ.items() if k not in (dispatch.ENV_VAR, "TRITON_INTERPRET")}
    result = subprocess.run([sys.executable, "-m", "simmim_fast.info"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name in registry():
        assert f"  {name} " in out
    for op in ALL_OPS:
        assert f"  {op} " in out
    assert "op -> backend on cpu" in out and "triton     unavailable" in out


@pytest.mark.parametrize("preset", ["vit-tiny", "swin-tiny"])
def test_models_trace_as_one_graph_under_torch_compile(preset):
    """The dispatch, the checks and the models must not break torch.compile's graph."""
    model = sf.build_simmim(preset)
    x = torch.randn(2, 3, 64, 64)
    mask = sf.MaskGenerator(64, 16, model.patch_size, 0.6).generate(2)
    explained = torch._dynamo.explain(model)(x, mask)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_ops_bind_arguments_like_the_reference():
    args = loss_args()
    positional = ops.masked_l1_loss(*args.values())
    assert torch.equal(positional, ops.masked_l1_loss(**args))
    with pytest.raises(TypeError, match="unexpected arguments"):
        ops.masked_l1_loss(**args, stride=2)
    with pytest.raises(TypeError, match="missing arguments"):
        ops.masked_l1_loss(args["reconstruction"], args["target"])


class FakeBackend(Backend):
    """A backend that implements every op and refuses the inputs when given reasons."""

    def __init__(self, name, reasons=()):
        self.name, self.ops, self.refusals = name, ALL_OPS, list(reasons)

    def not_supported_reasons(self, op, args):
        return self.refusals


def test_auto_skips_backends_that_give_reasons_even_when_first_or_measured(monkeypatch):
    fakes = {backend.name: backend for backend in (FakeBackend("first", ["first cannot take these inputs"]),
                                                   FakeBackend("second"), FakeBackend("third"))}
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "registry", lambda: fakes)
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("first", "second", "third"))
    monkeypatch.setattr(dispatch.tuning_table, "lazy_tuning_enabled", lambda device_type: False)
    monkeypatch.setattr(dispatch.tuning_table, "measured_choice", lambda op, args: None)
    assert dispatch.usable("masked_l1_loss", loss_args()) == ["second", "third"]
    assert dispatch.select("masked_l1_loss", loss_args()).name == "second"  # the first usable, unmeasured
    # A stale measurement naming the refusing backend is not followed; one naming a usable one is.
    monkeypatch.setattr(dispatch.tuning_table, "measured_choice", lambda op, args: "first")
    assert dispatch.select("masked_l1_loss", loss_args()).name == "second"
    monkeypatch.setattr(dispatch.tuning_table, "measured_choice", lambda op, args: "third")
    assert dispatch.select("masked_l1_loss", loss_args()).name == "third"
    # Only the refusing one in the order: an error listing its reason, not a call into it.
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("first",))
    with pytest.raises(dispatch.BackendError, match="first: first cannot take these inputs"):
        dispatch.select("masked_l1_loss", loss_args())


def fake_registry(monkeypatch, *backends):
    fakes = {backend.name: backend for backend in backends}
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "registry", lambda: fakes)
    monkeypatch.setattr(dispatch.tuning_table, "measured_choice", lambda op, args: None)
    monkeypatch.setattr(dispatch.tuning_table, "lazy_tuning_enabled", lambda device_type: False)


def test_auto_order_per_device_type_without_a_measurement(monkeypatch):
    sdpa = FakeBackend("sdpa")
    sdpa.ops = ("attention", "window_attention")
    fake_registry(monkeypatch, sdpa, *(FakeBackend(name) for name in ("reference", "triton", "cuda", "xformers", "xla")))
    chosen = {}
    for devices in ({"cuda"}, {"xla"}, {"cpu"}, {"cuda", "xla"}):
        monkeypatch.setattr(dispatch, "device_types", lambda args, devices=devices: devices)
        chosen[",".join(sorted(devices))] = [dispatch.select(op, loss_args()).name for op in ("attention", "masked_l1_loss")]
    # CUDA: PyTorch's SDPA for attention, the reference for the rest; XLA: its own; tensors on two device
    # types: the reference (which then reports the mix), never one device's order
    assert chosen == {"cuda": ["sdpa", "reference"], "xla": ["xla", "xla"], "cpu": ["reference", "reference"],
                      "cuda,xla": ["reference", "reference"]}


def test_explain_lists_every_backend_once_auto_order_first(monkeypatch):
    fake_registry(monkeypatch, FakeBackend("other", ["not today"]), FakeBackend("first", ["no"]), FakeBackend("second"))
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("first", "second"))
    assert dispatch.explain("attention", loss_args()) == [("first", ["no"]), ("second", []), ("other", ["not today"])]


def test_lazy_tuning_only_with_a_choice_and_outside_a_recording(monkeypatch):
    fake_registry(monkeypatch, FakeBackend("first"), FakeBackend("second", ["refused"]), FakeBackend("third"))
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("first", "second", "third"))
    seen = []
    monkeypatch.setattr(dispatch.tuning_table, "lazy_tuning_enabled", lambda device_type: seen.append(device_type) or True)
    monkeypatch.setattr(dispatch, "_lazy_tuner", [lambda op, args: "third"])  # what tuning registers
    assert dispatch.select("attention", loss_args()).name == "third" and seen == ["cpu"]
    with dispatch.recording(lambda op, args: None):  # the tuner's recording forward: no timing inside it
        assert dispatch.select("attention", loss_args()).name == "first"
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("second", "third"))  # one usable backend: nothing to tune
    monkeypatch.setattr(dispatch, "_lazy_tuner", [lambda op, args: pytest.fail("tuned without a choice")])
    assert dispatch.select("attention", loss_args()).name == "third"


def test_recording_sees_calls_inside_its_block_innermost_only(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    outer, inner = [], []
    with dispatch.recording(lambda op, args: outer.append(op)):
        ops.masked_l1_loss(**loss_args())
        with dispatch.recording(lambda op, args: inner.append(op)):
            ops.masked_l1_loss(**loss_args())
    ops.masked_l1_loss(**loss_args())
    assert (outer, inner, dispatch._recorders) == (["masked_l1_loss"], ["masked_l1_loss"], [])
