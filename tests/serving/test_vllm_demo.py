"""The demo's trained X-LoRA (SmolLM2-135M, three experts) served by vLLM: the held-out mixed documents score the
same loss as in peft-xlora (within 1e-3 nats, float32), and greedy continuations are identical.

Slow, and cached: it uses what `peft-xlora demo` trained and cached (the base model, the experts and the gate under
~/.cache/peft-xlora, keyed by the demo's recipe) and skips, saying so, when that cache is absent; it never trains.
"""

from __future__ import annotations

import pytest

pytest.importorskip(
    "vllm",
    reason="vLLM is not installed in this environment; scripts/test.sh runs tests/serving with the vLLM env that "
    "scripts/vllm_env.sh creates",
)

import torch
from xlora_vllm_cases import vllm_engine

from peft_xlora.serving.vllm import export_vllm

pytestmark = pytest.mark.slow

NEW_TOKENS = 16
PROMPT_TOKENS = 48


class _NotCached(Exception):
    pass


def _refuse_training(*args, **kwargs):
    raise _NotCached


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's base model, held-out data, and trained X-LoRA checkpoint, from the cache only."""
    from peft_xlora.cli.demo import run
    from peft_xlora.cli.demo.base import DemoSetupError, default_cache_dir
    from peft_xlora.cli.demo.data import DataError
    from peft_xlora.cli.demo.settings import preset

    demo = run.Demo(preset(tiny=False), default_cache_dir(), tmp_path_factory.mktemp("demo"), quiet=True)
    patch = pytest.MonkeyPatch()
    # Where the demo would train (no cached expert or gate for its recipe), this test skips instead.
    patch.setattr(run, "train_lora_expert", _refuse_training)
    patch.setattr(run, "train_steps", _refuse_training)
    try:
        demo.prepare_base()
        demo.prepare_data()
        demo.prepare_experts()
        demo.prepare_xlora()
    except _NotCached:
        pytest.skip(
            f"the demo's trained X-LoRA is not cached under {demo.cache_dir} for this recipe: run `peft-xlora demo` "
            "(about 10 min on 2 cores) with the same settings first"
        )
    except (DemoSetupError, DataError) as exc:
        pytest.skip(f"the demo's model or text is not available here: {exc}")
    finally:
        patch.undo()
    return demo


@torch.no_grad()
def test_the_demos_model_scores_and_generates_the_same_in_vllm(demo, tmp_path):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from peft_xlora.cli.demo.evaluate import token_losses
    from peft_xlora.cli.demo.run import OURS

    checkpoint = demo.xlora_dirs[OURS]
    model = demo.load_xlora()  # float32, as the demo's evaluation runs it
    documents = demo.eval_set.mixed.input_ids  # (n_docs, seq_len) held-out mixed-domain documents
    reference = token_losses(model, documents, batch_size=2)  # (n_docs, seq_len - 1) next-token cross-entropy
    prompts = [doc[:PROMPT_TOKENS].tolist() for doc in documents[:3]]
    greedy = []
    for prompt in prompts:
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
        greedy.append(out[0, len(prompt) :].tolist())

    served = export_vllm(checkpoint, tmp_path / "served", base_model=demo.base_dir)
    options = {"max_model_len": 512, "max_num_seqs": 8, "enforce_eager": False}
    with vllm_engine(served, **options) as llm:
        scored = llm.generate(
            [TokensPrompt(prompt_token_ids=doc.tolist()) for doc in documents],
            SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False),
            use_tqdm=False,
        )
        generated = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, detokenize=False),
            use_tqdm=False,
        )
    # Prompt log-probabilities: position t holds log p(token t | tokens before it), None for the first token.
    ours = torch.tensor(
        [
            [-entry[token].logprob for token, entry in zip(doc.tolist()[1:], result.prompt_logprobs[1:])]
            for doc, result in zip(documents, scored)
        ]
    )  # (n_docs, seq_len - 1)
    gap = (ours.mean() - reference.mean()).abs().item()
    assert gap < 1e-3, f"vLLM's loss {ours.mean():.6f} vs peft-xlora's {reference.mean():.6f} nats"
    torch.testing.assert_close(ours, reference, atol=2e-3, rtol=0)  # and token by token
    assert [list(g.outputs[0].token_ids) for g in generated] == greedy
