"""Encoder-decoder models: one gating classifier shared by both stacks, or one per stack? A small routing task.

The classifier reads the scaling pass's last hidden state of the encoder (source tokens) and of the decoder (target
tokens). A shared classifier must tell the stacks apart from those states alone; one per stack is told by
construction but has twice the parameters. The task: route every token to one of four experts by a random table of
its token id, learnt from the hidden states of a tiny random BART (the same ids occur in both stacks):

- ``agree``: the same table in both stacks;
- ``conflict``: the decoder's expert is the encoder's plus one (mod 4): every token must be routed differently in each
  stack, the hardest case for a shared classifier.

Both variants train the same steps with Adam on the gate's cross-entropy against the rule, and are scored on held-out
batches (routing accuracy, median over seeds). Run: ``python -m benchmarks.seq2seq_classifier [--out FILE]``; it
writes ``benchmarks/results/seq2seq-classifier.json`` with the provenance block of ``benchmarks/provenance.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import transformers as tf

from peft_xlora import XLoraConfig
from peft_xlora.core.classifier import XLoraClassifier

from .provenance import module_command, provenance, write_result

METRICS = ("encoder_accuracy", "decoder_accuracy", "cross_entropy")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "seq2seq-classifier.json")

VOCAB, BATCH, SRC, TGT, STEPS, SEEDS, BATCHES, EXPERTS = 64, 32, 12, 10, 300, 3, 20, 4


def _states(model: torch.nn.Module, seed: int) -> tuple[torch.Tensor, ...]:
    """(source ids, encoder states, target ids, decoder states) of one random batch."""
    generator = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (BATCH, SRC), generator=generator)
    tgt = torch.randint(3, VOCAB, (BATCH, TGT), generator=generator)
    with torch.no_grad():
        enc = model.get_encoder()(input_ids=src).last_hidden_state  # (batch, src, hidden)
        dec = model.get_decoder()(input_ids=tgt, encoder_hidden_states=enc).last_hidden_state  # (batch, tgt, hidden)
    return src, enc, tgt, dec


def _labels(table: torch.Tensor, ids: torch.Tensor, rule: str, stack: str) -> torch.Tensor:
    experts = table[ids]
    return (experts + 1) % EXPERTS if rule == "conflict" and stack == "decoder" else experts


def _run(rule: str, per_stack: bool, seed: int) -> tuple[float, float, float, int]:
    table = torch.randint(0, EXPERTS, (VOCAB,), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    model = tf.BartForConditionalGeneration(
        tf.BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        )
    ).eval()  # fmt: skip
    config = XLoraConfig(
        adapters={str(e): str(e) for e in range(EXPERTS)}, xlora_depth=2, xlora_size=32, xlora_dropout_p=0.0
    )
    config.classifier_init = "random"
    classifiers = {s: XLoraClassifier(config, 32, n_layers=1, n_experts=EXPERTS) for s in ("encoder", "decoder")}
    if not per_stack:
        classifiers["decoder"] = classifiers["encoder"]
    params = list({id(p): p for c in classifiers.values() for p in c.parameters()}.values())
    optimizer = torch.optim.Adam(params, lr=1e-2)
    batches = [_states(model, 1000 * seed + i) for i in range(BATCHES)]  # the training set, cycled
    for step in range(STEPS):
        src, enc, tgt, dec = batches[step % BATCHES]
        loss = sum(
            torch.nn.functional.cross_entropy(
                classifiers[s](h)[:, :, 0].flatten(0, 1), _labels(table, ids, rule, s).flatten()
            )
            for s, ids, h in (("encoder", src, enc), ("decoder", tgt, dec))
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy, entropy = {}, 0.0
    with torch.no_grad():
        src, enc, tgt, dec = _states(model, 10**6 + seed)  # held out
        for s, ids, h in (("encoder", src, enc), ("decoder", tgt, dec)):
            logits = classifiers[s](h)[:, :, 0]
            labels = _labels(table, ids, rule, s)
            accuracy[s] = (logits.argmax(-1) == labels).float().mean().item()
            entropy += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item() / 2
    return accuracy["encoder"], accuracy["decoder"], entropy, sum(p.numel() for p in params)


def main(argv: list[str] | None = None) -> dict:
    """Runs both rules with both classifier layouts, prints the table and writes the result file."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT, help="the result file (default: %(default)s)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    block = provenance(module_command("benchmarks.seq2seq_classifier", argv))
    print("| rule | classifier | parameters | encoder accuracy | decoder accuracy | held-out cross-entropy |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    rows = []
    for rule in ("agree", "conflict"):
        for per_stack in (False, True):
            runs = [_run(rule, per_stack, seed) for seed in range(SEEDS)]
            enc = statistics.median(r[0] for r in runs)
            dec = statistics.median(r[1] for r in runs)
            ce = statistics.median(r[2] for r in runs)
            name = "one per stack" if per_stack else "shared"
            rows.append(
                {
                    "rule": rule,
                    "classifier": name,
                    "parameters": runs[0][3],
                    "encoder_accuracy": enc,
                    "decoder_accuracy": dec,
                    "cross_entropy": ce,
                    "per_seed": [dict(zip(METRICS, r)) for r in runs],
                }
            )
            print(f"| {rule} | {name} | {runs[0][3]} | {enc:.3f} | {dec:.3f} | {ce:.3f} |", flush=True)
    settings = {"vocab": VOCAB, "batch": BATCH, "source": SRC, "target": TGT, "steps": STEPS, "seeds": SEEDS}
    payload = {"settings": {**settings, "batches": BATCHES, "experts": EXPERTS}, "rows": rows}
    write_result(args.out, payload, block)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
