"""The scalings log: what is recorded per forward and per generation step, its model API, and its files."""

import json
import os

import pytest
import torch
from peft_xlora.xlora_utils import load_scalings_log as load_scalings_log_from_utils

from helpers.models import build_xlora, input_ids
from peft_xlora import load_scalings_log, save_scalings_log


@pytest.fixture
def model(expert_dirs):
    return build_xlora("llama", expert_dirs).eval()


def n_layers(model):
    return len(model.base_model.mixture_layer_names)


def test_nothing_is_logged_until_enabled(model):
    model(input_ids=input_ids())
    assert model.get_scalings_log() == []
    assert not model.is_scalings_logging_enabled()


@pytest.mark.parametrize("layerwise", [False, True])
def test_each_forward_logs_its_scalings_detached_on_cpu(expert_dirs, layerwise):
    model = build_xlora("llama", expert_dirs, layerwise_scalings=layerwise).train()  # classifier has grad here
    model.enable_scalings_logging()
    latest = []
    for seq in (7, 4, 7):
        model(input_ids=input_ids(seq=seq), labels=input_ids(seq=seq))
        latest.append(model.get_latest_scalings().clone())
    log = model.get_scalings_log()
    assert [tuple(e.shape) for e in log] == [(2, s, n_layers(model), 3) for s in (7, 4, 7)]
    for entry, expected in zip(log, latest):
        assert entry.device.type == "cpu" and not entry.requires_grad and entry.dtype == torch.float32
        torch.testing.assert_close(entry, expected, rtol=0, atol=0)
    # The scalings really are a per-token softmax over the experts, different from token to token.
    torch.testing.assert_close(log[0].sum(-1), torch.ones(2, 7, n_layers(model)))
    assert not torch.allclose(log[0][:, 0], log[0][:, 1])


def test_log_does_not_share_memory_with_the_model(model):
    model.enable_scalings_logging()
    model(input_ids=input_ids())
    before = model.get_scalings_log()[0].clone()
    model.base_model.router._latest.mul_(0)  # whatever happens to the model's tensors later
    torch.testing.assert_close(model.get_scalings_log()[0], before, rtol=0, atol=0)


def test_get_scalings_log_is_a_shallow_copy(model):
    model.enable_scalings_logging()
    model(input_ids=input_ids())
    copy = model.get_scalings_log()
    copy.append(torch.zeros(1))
    copy.clear()
    assert len(model.get_scalings_log()) == 1


def test_disable_keeps_the_log_unless_asked_to_clear(model):
    model.enable_scalings_logging()
    model(input_ids=input_ids())
    model.disable_scalings_logging()
    model(input_ids=input_ids())  # not logged
    assert len(model.get_scalings_log()) == 1
    model.enable_scalings_logging()
    model(input_ids=input_ids())
    assert len(model.get_scalings_log()) == 2
    model.clear_scalings_log()
    assert model.get_scalings_log() == [] and model.is_scalings_logging_enabled()
    model(input_ids=input_ids())
    model.disable_scalings_logging(clear=True)  # the original package's behaviour
    assert model.get_scalings_log() == [] and not model.is_scalings_logging_enabled()


def test_static_scalings_are_not_predictions_and_are_not_logged(model):
    model.enable_scalings_logging()
    model.set_static_scalings(torch.tensor([1.0, 0.0, 0.0]))
    model(input_ids=input_ids())
    assert model.get_scalings_log() == []


def test_bucketed_log_groups_by_sequence_length(model):
    model.enable_scalings_logging()
    for seq in (5, 3, 5, 2, 3):
        model(input_ids=input_ids(seq=seq, seed=seq))
    log = model.get_scalings_log()
    buckets = model.get_bucketed_scalings_log()
    assert sorted(buckets) == [2, 3, 5]
    assert buckets[5][0] == [0, 2] and buckets[3][0] == [1, 4] and buckets[2][0] == [3]
    for positions, entries in buckets.values():
        for position, entry in zip(positions, entries):
            torch.testing.assert_close(entry, log[position], rtol=0, atol=0)


def test_cached_generation_logs_the_new_tokens_of_each_step(model):
    # Caching is exact, so each step's entry equals the matching positions of one uncached forward over the output.
    model.enable_scalings_logging()
    prompt = input_ids(batch=2, seq=5)
    out = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    log = model.get_scalings_log()
    assert [e.shape[1] for e in log] == [5, 1, 1, 1]
    model.clear_scalings_log()
    model(input_ids=out[:, :-1], use_cache=False)
    (full,) = model.get_scalings_log()  # (2, 8, n_layers, 3)
    torch.testing.assert_close(torch.cat(log, dim=1), full, rtol=1e-5, atol=1e-6)


def test_prompt_mode_generation_logs_the_held_scalings(model):
    model.enable_scalings_logging()
    model.generate(input_ids=input_ids(batch=2, seq=5), max_new_tokens=3, do_sample=False, scalings_mode="prompt")
    prompt_entry, *steps = model.get_scalings_log()
    assert prompt_entry.shape[1] == 5 and [s.shape[1] for s in steps] == [1, 1]
    for step in steps:
        torch.testing.assert_close(step, prompt_entry[:, -1:], rtol=0, atol=0)


def test_print_scalings_predictions_prints_the_next_n(model, capsys):
    model.print_scalings_predictions(2)
    for _ in range(3):
        model(input_ids=input_ids(batch=1, seq=2))
    printed = capsys.readouterr().out
    assert printed.count("X-LoRA scalings") == 2
    assert "math" in printed and "tensor(" in printed
    assert model.get_scalings_log() == []  # printing does not log
    with pytest.raises(ValueError, match="n_predictions_lifetime"):
        model.print_scalings_predictions(-1)


# ---------------------------------------------------------------------------------------------------- files


def test_flush_same_shapes_writes_one_stacked_file(model, tmp_path):
    model.enable_scalings_logging()
    for seed in range(3):
        model(input_ids=input_ids(seed=seed))
    log = model.get_scalings_log()
    written = model.flush_log_scalings(tmp_path / "log")
    assert written == [str(tmp_path / "log.safetensors")] and sorted(os.listdir(tmp_path)) == ["log.safetensors"]
    from safetensors.torch import load_file

    stacked = load_file(tmp_path / "log.safetensors")["scalings"]
    assert stacked.shape == (3, 2, 7, n_layers(model), 3)  # (num_logged, batch, seq, n_layers, n_experts)
    loaded = load_scalings_log(tmp_path / "log")
    assert len(loaded) == 3
    for a, b in zip(loaded, log):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(model.get_scalings_log()) == 3  # flushing keeps the log


def test_flush_mixed_shapes_writes_one_file_per_length_and_a_mapping(model, tmp_path):
    model.enable_scalings_logging()
    model.generate(input_ids=input_ids(batch=1, seq=4), max_new_tokens=3, do_sample=False)  # seq 4, 1, 1
    model(input_ids=input_ids(batch=1, seq=4, seed=3))
    log = model.get_scalings_log()
    model.flush_log_scalings(str(tmp_path / "run" / "log"))
    folder = tmp_path / "run"
    assert sorted(os.listdir(folder)) == ["log.json", "log.seq1.safetensors", "log.seq4.safetensors"]
    manifest = json.loads((folder / "log.json").read_text())
    assert {f["file"]: f["positions"] for f in manifest["files"]} == {
        "log.seq4.safetensors": [0, 3],
        "log.seq1.safetensors": [1, 2],
    }
    os.rename(folder, tmp_path / "moved")  # file names in the mapping are relative
    loaded = load_scalings_log_from_utils(str(tmp_path / "moved" / "log"))
    assert [e.shape for e in loaded] == [e.shape for e in log]
    for a, b in zip(loaded, log):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_save_keeps_dtype_and_drops_autograd(tmp_path):
    g = torch.Generator().manual_seed(0)
    entries = [
        torch.rand(2, 3, 4, 5, generator=g).bfloat16(),
        torch.rand(2, 3, 4, 5, generator=g).bfloat16(),
    ]
    needs_grad = torch.rand(2, 3, 4, 5, generator=g, requires_grad=True)
    mixed = [*entries, needs_grad * 2, torch.rand(1, 3, 4, 5, generator=g), torch.rand(2, 6, 4, 5, generator=g)]
    save_scalings_log(entries, tmp_path / "bf16")
    loaded = load_scalings_log(tmp_path / "bf16")
    assert all(e.dtype == torch.bfloat16 for e in loaded)
    for a, b in zip(loaded, entries):
        assert torch.equal(a, b)
    # Same sequence length but another dtype or batch size: separate files, same order back.
    written = save_scalings_log(mixed, tmp_path / "mixed")
    assert len(written) == 5  # bf16 seq3, fp32 seq3 batch 2, fp32 seq3 batch 1, fp32 seq6, mapping
    loaded = load_scalings_log(tmp_path / "mixed")
    assert [e.dtype for e in loaded] == [e.dtype for e in mixed]
    for a, b in zip(loaded, mixed):
        assert not a.requires_grad
        assert torch.equal(a, b.detach())


def test_a_later_flush_replaces_the_other_layout(tmp_path):
    same = [torch.full((1, 2, 3, 4), float(i)) for i in range(2)]
    mixed = [torch.zeros(1, 2, 3, 4), torch.ones(1, 5, 3, 4)]
    save_scalings_log(mixed, tmp_path / "log")
    save_scalings_log(same, tmp_path / "log")
    assert not (tmp_path / "log.json").exists()
    assert all(torch.equal(a, b) for a, b in zip(load_scalings_log(tmp_path / "log"), same))
    save_scalings_log(mixed, tmp_path / "log")
    assert not (tmp_path / "log.safetensors").exists()
    assert [e.shape[1] for e in load_scalings_log(tmp_path / "log")] == [2, 5]


def test_file_errors_say_what_to_do(model, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        model.flush_log_scalings(tmp_path / "log")
    with pytest.raises(ValueError, match="without one"):
        save_scalings_log([torch.zeros(1, 1, 1, 1)], tmp_path / "log.safetensors")
    with pytest.raises(ValueError, match=r"\(batch, seq_len, n_layers, n_experts\)"):
        save_scalings_log([torch.zeros(1, 1, 1)], tmp_path / "log")
    with pytest.raises(FileNotFoundError, match="flush_log_scalings"):
        load_scalings_log(tmp_path / "missing")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_log_entries_of_a_cuda_model_are_on_cpu(expert_dirs, tmp_path):
    model = build_xlora("llama", expert_dirs).eval().cuda()
    model.enable_scalings_logging()
    model.generate(input_ids=input_ids(batch=2, seq=5).cuda(), max_new_tokens=2, do_sample=False)
    log = model.get_scalings_log()
    assert [e.device.type for e in log] == ["cpu"] * 2
    torch.testing.assert_close(log[-1], model.get_latest_scalings().cpu(), rtol=0, atol=0)
    model.flush_log_scalings(tmp_path / "log")
    for a, b in zip(load_scalings_log(tmp_path / "log"), log):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
