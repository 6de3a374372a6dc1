"""Gating plots, headless: the drawn values against the scalings, labels, files, and errors."""

import sys

import pytest
import torch

from helpers.models import build_xlora, input_ids
from helpers.tiny_tokenizer import tiny_tokenizer
from peft_xlora import plot_scalings

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def model_and_ids(expert_dirs):
    model = build_xlora("llama", expert_dirs, layerwise_scalings=True).eval()
    ids = input_ids(batch=2, seq=6)
    model(input_ids=ids)
    return model, ids


def drawn(fig):
    """The heatmap's values, (rows, experts)."""
    (ax, _colorbar) = fig.axes
    return torch.as_tensor(ax.images[0].get_array().data)


def row_labels(fig):
    return [t.get_text() for t in fig.axes[0].get_yticklabels()]


def test_tokens_view_is_the_mean_over_layers_with_decoded_tokens(model_and_ids, tmp_path):
    model, ids = model_and_ids
    scalings = model.get_latest_scalings()  # (2, 6, n_layers, 3), layerwise: layers differ
    assert not torch.allclose(scalings[:, :, 0], scalings[:, :, 1])
    tokenizer = tiny_tokenizer()
    fig = plot_scalings(model, tmp_path / "gate.png", tokenizer=tokenizer, input_ids=ids, batch_index=1)
    torch.testing.assert_close(drawn(fig), scalings[1].mean(dim=1))
    assert row_labels(fig) == [repr(f"w{i}") for i in ids[1].tolist()]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["math", "code", "poetry"]
    assert (tmp_path / "gate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_layer_of_the_tokens_view(model_and_ids, tmp_path):
    model, _ = model_and_ids
    scalings = model.get_latest_scalings()
    fig = plot_scalings(scalings, tmp_path / "layer.svg", layer=-1, tokens=[f"t{i}" for i in range(6)])
    torch.testing.assert_close(drawn(fig), scalings[0, :, -1])
    assert row_labels(fig) == [f"t{i}" for i in range(6)]
    assert "<svg" in (tmp_path / "layer.svg").read_text()[:500]


def test_layers_view_is_the_mean_over_tokens(model_and_ids, tmp_path):
    model, _ = model_and_ids
    scalings = model.get_latest_scalings()
    fig = plot_scalings(model, tmp_path / "layers.png", view="layers")
    torch.testing.assert_close(drawn(fig), scalings[0].mean(dim=0))
    assert row_labels(fig) == model.base_model.mixture_layer_names
    fig = plot_scalings(scalings[0], view="layers", expert_names=["a", "b", "c"])  # (seq, n_layers, n_experts)
    assert row_labels(fig) == [str(i) for i in range(scalings.shape[2])]


def test_a_generation_log_entry_plots(expert_dirs):
    model = build_xlora("llama", expert_dirs).eval()
    model.enable_scalings_logging()
    model.generate(input_ids=input_ids(batch=1, seq=4), max_new_tokens=2, do_sample=False)
    step = model.get_scalings_log()[-1]  # (1, 1, n_layers, 3)
    fig = plot_scalings(step)
    torch.testing.assert_close(drawn(fig), step[0].mean(dim=1))


def test_errors_say_what_is_wrong(model_and_ids, expert_dirs, tmp_path):
    model, _ = model_and_ids
    scalings = model.get_latest_scalings()
    with pytest.raises(ValueError, match="image format"):
        plot_scalings(scalings, tmp_path / "gate.jpg")
    with pytest.raises(ValueError, match="3 token labels for scalings of 6 tokens"):
        plot_scalings(scalings, tokens=["a", "b", "c"])
    with pytest.raises(ValueError, match="out of range"):
        plot_scalings(scalings, layer=99)
    with pytest.raises(ValueError, match="batch_index"):
        plot_scalings(scalings, batch_index=2)
    with pytest.raises(ValueError, match="n_experts"):
        plot_scalings(scalings[0, 0, 0])
    with pytest.raises(ValueError, match="no scalings yet"):
        plot_scalings(build_xlora("llama", expert_dirs))


def test_missing_matplotlib_names_the_extra(monkeypatch, model_and_ids):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now fails as if not installed
    with pytest.raises(ImportError, match=r"pip install matplotlib \(peft-xlora.s `plot` extra\)"):
        plot_scalings(model_and_ids[0].get_latest_scalings())
