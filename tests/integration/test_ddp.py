"""Two-process data parallel training on CPU (gloo) through accelerate equals one process on the same global batch.

The processes are launched as `accelerate.debug_launcher` does it (forked, meeting through a file store, so no network
port is taken and tests can run beside others), but with the store file in the test's own folder: the processes end
with `destroy_process_group()`, which deletes the store file, and `debug_launcher`'s own temporary file would then
fail to be removed. Each process trains on its half of the global batch; DDP averages the gradients, which for
equal-length halves is the gradient of the full batch's mean loss.
"""

from __future__ import annotations

import os

import pytest
import torch

from helpers.models import build_xlora, input_ids

GLOBAL_BATCH = 4
LR = 0.5

VARIANTS = {
    "dense": {},
    # Top-k zeroes whole experts per token; the stacked factors are still used by every token, so DDP's default
    # `find_unused_parameters=False` works (no parameter goes unused).
    "topk-trainable-experts": {"top_k_lora": 1, "use_trainable_adapters": True},
    "layerwise-checkpointed": {"layerwise_scalings": True, "_checkpointing": "non_reentrant"},
    "reentrant-checkpointed": {"_checkpointing": "reentrant"},
    # Trainer wraps PEFT models with find_unused_parameters=True unless told otherwise.
    "find-unused-non-reentrant": {"top_k_lora": 2, "_checkpointing": "non_reentrant", "_find_unused": True},
    "find-unused-reentrant": {"_checkpointing": "reentrant", "_find_unused": True},
    # No scaling pass: static weights (a trained parameter) up to layer 1, the gate on its output after.
    "single-pass": {"routing": "single_pass", "scaling_pass_layers": 1},
    "single-pass-reentrant": {"routing": "single_pass", "scaling_pass_layers": 1, "_checkpointing": "reentrant"},
}


def _build(expert_dirs: dict, variant: str):
    overrides = {k: v for k, v in VARIANTS[variant].items() if not k.startswith("_")}
    torch.manual_seed(0)
    model = build_xlora("llama", expert_dirs, xlora_dropout_p=0.0, **overrides)
    mode = VARIANTS[variant].get("_checkpointing")
    if mode is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
    model.train()
    return model


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _global_batch() -> torch.Tensor:
    return input_ids(batch=GLOBAL_BATCH, seq=10, seed=7)


def _ddp_worker(expert_dirs: dict, variant: str, out_path: str) -> None:
    """Runs in each forked process: one SGD step on this rank's half of the global batch."""
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # One thread per process. A forked child must not use the OpenMP thread pool its parent started (any earlier test
    # did): it would wait forever on threads that were not forked. accelerate sets the thread count of a CPU process
    # from OMP_NUM_THREADS when it is set, from the core count otherwise.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    # The fork inherits the parent's accelerate singletons (e.g. from a Trainer test): start from a clean state.
    AcceleratorState._reset_state(reset_partial_state=True)
    from accelerate.utils import DistributedDataParallelKwargs

    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=VARIANTS[variant].get("_find_unused", False))
    accelerator = Accelerator(cpu=True, kwargs_handlers=[ddp_kwargs])
    assert accelerator.num_processes == 2 and dist.get_backend() == "gloo"
    model = _build(expert_dirs, variant)
    optimizer = torch.optim.SGD(list(_trainable(model).values()), lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    shard = _global_batch().chunk(2)[accelerator.process_index]
    loss = model(input_ids=shard, labels=shard).loss
    accelerator.backward(loss)
    grads = {n: p.grad.clone() for n, p in _trainable(accelerator.unwrap_model(model)).items()}
    optimizer.step()
    weights = {n: p.detach().clone() for n, p in _trainable(accelerator.unwrap_model(model)).items()}
    losses = accelerator.gather(loss.detach()[None])
    if accelerator.is_main_process:
        torch.save({"grads": grads, "weights": weights, "losses": losses}, out_path)
    # Without these, gloo processes sometimes abort at exit ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def _single_process(expert_dirs: dict, variant: str) -> dict:
    model = _build(expert_dirs, variant)
    optimizer = torch.optim.SGD(list(_trainable(model).values()), lr=LR)
    batch = _global_batch()
    model(input_ids=batch, labels=batch).loss.backward()
    grads = {n: p.grad.clone() for n, p in _trainable(model).items()}
    optimizer.step()
    return {"grads": grads, "weights": {n: p.detach().clone() for n, p in _trainable(model).items()}}


def launch_two_processes(function, args: tuple, store_file: str) -> None:
    """`accelerate.debug_launcher(function, args, num_processes=2)` with the rendezvous file at `store_file`."""
    from accelerate.utils import PrepareForLaunch, patch_environment
    from torch.multiprocessing import start_processes

    with patch_environment(
        world_size=2,
        master_addr="127.0.0.1",
        master_port="29500",
        accelerate_mixed_precision="no",
        accelerate_debug_rdv_file=store_file,
        accelerate_use_cpu="yes",
        gloo_socket_ifname="lo",
    ):
        start_processes(PrepareForLaunch(function, debug=True), args=args, nprocs=2, start_method="fork")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_process_step_equals_single_process_step(variant, expert_dirs, tmp_path):
    out_path = str(tmp_path / "rank0.pt")
    launch_two_processes(_ddp_worker, (expert_dirs, variant, out_path), str(tmp_path / "store"))
    ddp = torch.load(out_path)
    ref = _single_process(expert_dirs, variant)

    assert ddp["losses"].shape == (2,) and not torch.equal(ddp["losses"][0], ddp["losses"][1])  # distinct shards
    assert ddp["grads"].keys() == ref["grads"].keys()
    if VARIANTS[variant].get("use_trainable_adapters"):
        assert any(n.endswith("xlora_A") for n in ref["grads"])
    for name, grad in ref["grads"].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(ddp["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(ddp["weights"][name], ref["weights"][name], rtol=1e-4, atol=1e-6, msg=name)
