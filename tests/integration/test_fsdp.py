"""Sharded training: accelerate's FSDP2 plugin, two processes on CPU (gloo), equals one process on the global batch.

Under `FullyShardedDataParallelPlugin(fsdp_version=2)` every parameter is sharded across the ranks, the frozen experts'
stacked factors and the gating classifier included (each decoder layer and the root model are `fully_shard`-ed).
Each rank trains on its half of the global batch; FSDP2 reduce-scatters the gradients (averaged), which for
equal-length halves is the gradient of the full batch's mean loss. The gathered gradient of the gate must equal the
single-process gradient, and the full state dict gathered after the step must save a checkpoint that reloads into a
fresh model exactly. Processes are forked as in `test_ddp.py`, with a deadline: a hung rank fails the test.
"""

from __future__ import annotations

import faulthandler
import os

import pytest
import torch

from helpers.distributed import launch_two_processes
from helpers.models import build_xlora, input_ids, tiny_llama

GLOBAL_BATCH = 4
LR = 0.5
DEADLINE_S = 180

VARIANTS = {
    "dense": {},
    "layerwise-checkpointed": {"layerwise_scalings": True, "_checkpointing": True},
    # The stacked factors train too: their sharded gradients are reduce-scattered like the classifier's.
    # The whole-model gate: at top-1 it picks every expert for some token of these inputs, so every expert's
    # factors get a gradient to compare (the default's layer-1 gate never picks the one that adapts the embedding).
    "topk-trainable-experts": {"top_k_lora": 1, "use_trainable_adapters": True, "scaling_pass_layers": None},
}


def _build(expert_dirs: dict, variant: str):
    overrides = {k: v for k, v in VARIANTS[variant].items() if not k.startswith("_")}
    torch.manual_seed(0)
    model = build_xlora("llama", expert_dirs, xlora_dropout_p=0.0, classifier_init="random", **overrides)
    if VARIANTS[variant].get("_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _global_batch() -> torch.Tensor:
    return input_ids(batch=GLOBAL_BATCH, seq=10, seed=7)


def _fsdp_worker(expert_dirs: dict, variant: str, out_dir: str) -> None:
    """Runs in each forked process: one SGD step on this rank's half, then the gathered state dict saved by rank 0."""
    import torch.distributed as dist
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    # A hung collective prints every rank's stack (and ends the rank) before the test's deadline.
    faulthandler.dump_traceback_later(DEADLINE_S - 20, exit=True)
    os.environ["OMP_NUM_THREADS"] = "1"  # see test_ddp.py: a forked child must not reuse the parent's thread pool
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"]
    )
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    assert accelerator.num_processes == 2 and dist.get_backend() == "gloo"
    # accelerate turns the plugin on only for accelerator devices (MULTI_GPU and the like), never MULTI_CPU; set what
    # it would have set, so `prepare`, `backward` and `get_state_dict` take their FSDP2 paths on gloo (`prepare` sets
    # the CPU type back afterwards, so it is set again).
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    model = _build(expert_dirs, variant)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.state.distributed_type = DistributedType.FSDP
    assert accelerator.is_fsdp2
    # Every parameter is sharded: the frozen stacked factors and the classifier too.
    assert any(isinstance(m, FSDPModule) for m in model.modules())
    names = dict(model.named_parameters())
    assert all(isinstance(p, DTensor) for p in names.values())
    assert any(n.endswith("xlora_A") for n in names) and any("xlora_classifier" in n for n in names)
    shard = _global_batch().chunk(2)[accelerator.process_index]
    loss = model(input_ids=shard, labels=shard).loss
    accelerator.backward(loss)
    grads = {n: p.grad.full_tensor() for n, p in names.items() if p.grad is not None}
    optimizer.step()
    # A collective: every rank calls it; rank 0 gets the full tensors (on the CPU), the others an empty dict.
    state = accelerator.get_state_dict(model)
    losses = accelerator.gather(loss.detach()[None])
    if accelerator.is_main_process:
        assert not any(isinstance(v, DTensor) for v in state.values())
        peft_model = accelerator.unwrap_model(model)
        peft_model.save_pretrained(os.path.join(out_dir, "checkpoint"), state_dict=state)
        torch.save({"grads": grads, "losses": losses, "state": state}, os.path.join(out_dir, "rank0.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _single_process(expert_dirs: dict, variant: str) -> tuple[dict, torch.nn.Module]:
    model = _build(expert_dirs, variant)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    batch = _global_batch()
    model(input_ids=batch, labels=batch).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return grads, model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fsdp2_step_equals_single_process_and_saves_a_full_checkpoint(variant, expert_dirs, tmp_path):
    from peft import PeftModel

    store = str(tmp_path / "store")
    launch_two_processes(_fsdp_worker, (expert_dirs, variant, str(tmp_path)), store, deadline_s=DEADLINE_S)
    sharded = torch.load(tmp_path / "rank0.pt")
    grads, reference = _single_process(expert_dirs, variant)

    assert sharded["losses"].shape == (2,) and not torch.equal(sharded["losses"][0], sharded["losses"][1])
    assert sharded["grads"].keys() == grads.keys() and any("xlora_classifier" in n for n in grads)
    trainable_experts = VARIANTS[variant].get("use_trainable_adapters", False)
    assert all("xlora_classifier" in n or (trainable_experts and n.endswith(("xlora_A", "xlora_B"))) for n in grads)
    assert trainable_experts == any(n.endswith("xlora_A") for n in grads)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(sharded["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # The gathered state dict is the single-process model's after the same step (every tensor, experts included).
    expected = reference.state_dict()
    assert sharded["state"].keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(sharded["state"][name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    # The checkpoint rank 0 saved from it reloads exactly: the same outputs as the model it was gathered from.
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "checkpoint").eval()
    gathered = _build(expert_dirs, variant).eval()
    gathered.load_state_dict(sharded["state"])
    ids = input_ids(batch=2, seq=6, seed=11)
    torch.testing.assert_close(loaded(input_ids=ids).logits, gathered(input_ids=ids).logits, rtol=0, atol=0)
