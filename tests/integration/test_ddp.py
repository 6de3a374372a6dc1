"""Two-process data parallel training on CPU (gloo) through accelerate equals one process on the same global batch.

The processes are launched as `accelerate.debug_launcher` does it (forked, meeting through a file store, so no network
port is taken and tests can run beside others), but with the store file in the test's own folder: the processes end
with `destroy_process_group()`, which deletes the store file, and `debug_launcher`'s own temporary file would then
fail to be removed. Each process trains on its half of the global batch; DDP averages the gradients, which for
equal-length halves is the gradient of the full batch's mean loss.

No run may hang (one once hung 20 minutes in gloo after both ranks had finished; here 2 of about 36 launches hung
the same way, after the work was done, while the function returned). So: the process group gets a timeout (the
launch sets it up itself, as accelerate's debug launch does, since that launch ignores `InitProcessGroupKwargs`), a
collective that one rank never joins fails in seconds, the launcher has an overall deadline after which it kills
both processes and fails the test with a message that says so, and each rank frees DDP's reducer before the process
group goes (0 hangs in 120 launches since).
"""

from __future__ import annotations

import gc
import os
import time

import pytest
import torch

from helpers.distributed import launch_two_processes
from helpers.models import build_xlora, input_ids

GLOBAL_BATCH = 4
LR = 0.5

VARIANTS = {
    "dense": {},
    # Top-k zeroes whole experts per token; the stacked factors are still used by every token, so DDP's default
    # `find_unused_parameters=False` works (no parameter goes unused).
    # The whole-model gate: at top-1 it picks every expert for some token of these inputs, so every expert's
    # factors get a gradient to compare (the default's layer-1 gate never picks the one that adapts the embedding).
    "topk-trainable-experts": {"top_k_lora": 1, "use_trainable_adapters": True, "scaling_pass_layers": None},
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
    gc.freeze()  # the objects inherited from the parent: the collection at the end then only scans this process's own
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
    # DDP's reducer must go while its process group exists: freed after `destroy_process_group`, when this function
    # returned, it sometimes hung (2 of ~36 launches here, with gloo's threads waiting after the work was done).
    del model, optimizer, accelerator
    gc.collect()
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


def _hanging_worker(hang: str) -> None:
    """Rank 1 never joins the collective (or, with hang="both", no rank ever ends)."""
    import torch.distributed as dist

    if hang == "both" or dist.get_rank() == 1:
        time.sleep(3600)
    dist.barrier()  # rank 0 waits here for rank 1, which never comes


@pytest.mark.parametrize(
    ("hang", "expected"),
    [("one-rank", "ProcessRaisedException"), ("both", "TimeoutError")],
    ids=["process-group-timeout", "launch-deadline"],
)
def test_a_hung_rank_fails_quickly(tmp_path, hang, expected):
    # A collective one rank never joins fails after the process-group timeout; ranks that never end are killed at
    # the launcher's deadline. Either way the test gets an error within seconds, not a hang.
    start = time.monotonic()
    with pytest.raises(Exception) as info:
        launch_two_processes(_hanging_worker, (hang,), str(tmp_path / "store"), deadline_s=6, timeout_s=3)
    assert type(info.value).__name__ == expected, info.value
    assert time.monotonic() - start < 60
