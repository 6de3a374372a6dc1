"""Train the X-LoRA gate under accelerate's FSDP2 plugin on GPUs, and save a full checkpoint (not run in CI).

On CPU accelerate never enables its FSDP plugin (`tests/integration/test_fsdp.py` therefore forces its FSDP2 path on
gloo); this script is the same check on real devices, where the plugin is on by itself. It trains one SGD step on a
tiny random Llama with two random experts, compares the gathered gate gradient with rank 0's single-process gradient
on the same global batch, and saves the gathered checkpoint.

    accelerate launch --num_processes 2 benchmarks/fsdp2_gpu.py /tmp/xlora-fsdp2
"""

from __future__ import annotations

import sys
import tempfile

import torch
import torch.distributed as dist
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_xlora


def base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def xlora(experts: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    config = peft_xlora.XLoraConfig(task_type="CAUSAL_LM", adapters=experts, classifier_init="random")
    return get_peft_model(base(), config).train()


def main(out_dir: str) -> None:
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"]
    )
    accelerator = Accelerator(fsdp_plugin=plugin)
    assert accelerator.is_fsdp2, "accelerate did not turn on FSDP2 (run on GPUs with accelerate launch)"
    experts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, targets in enumerate((["q_proj", "v_proj"], ["o_proj", "down_proj"])):
            torch.manual_seed(10 + i)
            lora = get_peft_model(base(), LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
            if accelerator.is_main_process:
                lora.save_pretrained(f"{tmp}/e{i}")
            experts[f"e{i}"] = f"{tmp}/e{i}"
        accelerator.wait_for_everyone()
        batch = torch.randint(3, 97, (2 * accelerator.num_processes, 10), generator=torch.Generator().manual_seed(7))
        reference = None
        if accelerator.is_main_process:  # one process, the whole global batch
            single = xlora(experts).to(accelerator.device)
            single(input_ids=batch.to(accelerator.device), labels=batch.to(accelerator.device)).loss.backward()
            reference = {n: p.grad.cpu() for n, p in single.named_parameters() if p.grad is not None}
        model = xlora(experts)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model, optimizer = accelerator.prepare(model, optimizer)
        shard = batch.chunk(accelerator.num_processes)[accelerator.process_index].to(accelerator.device)
        accelerator.backward(model(input_ids=shard, labels=shard).loss)
        grads = {n: p.grad.full_tensor().cpu() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        state = accelerator.get_state_dict(model)  # every process calls it; the main one gets the full tensors
        if accelerator.is_main_process:
            for name, grad in reference.items():
                torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
            accelerator.unwrap_model(model).save_pretrained(out_dir, state_dict=state)
            print(f"gate gradients equal single-process ({len(reference)} tensors); checkpoint saved to {out_dir}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "xlora-fsdp2")
