"""The routing benchmark (benchmarks/routing, issue 25): its parts against plain references, and a tiny smoke run."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from helpers.models import build_xlora, input_ids, tiny_llama
from helpers.reference import distillation_reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # `benchmarks` lives beside `src`, not inside the installed package
    sys.path.insert(0, ROOT)

from benchmarks import corpora  # noqa: E402
from benchmarks.provenance import check_result  # noqa: E402
from benchmarks.routing import features  # noqa: E402
from benchmarks.routing import variants as V  # noqa: E402
from benchmarks.routing.__main__ import main  # noqa: E402
from benchmarks.routing.bench import distillation  # noqa: E402
from benchmarks.routing.metrics import switch_distance  # noqa: E402

from peft_xlora.cli.demo.evaluate import pinned_token_losses  # noqa: E402
from peft_xlora.core.classifier import gate  # noqa: E402
from peft_xlora.core.model import find_tuner  # noqa: E402


def test_switch_distance_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    domains = torch.randint(0, 3, (4, 30), generator=g)
    got = switch_distance(domains)
    for row in range(domains.shape[0]):
        last = None
        for t in range(domains.shape[1] - 1):  # position t predicts token t + 1
            if domains[row, t + 1] != domains[row, t]:
                last = t
            if last is None:
                assert got[row, t] > 64
            else:
                assert got[row, t] == t - last + 1


def test_distillation_from_cached_expert_losses_equals_the_library_term(expert_dirs):
    # The benchmark computes every expert's loss once per gate batch and adds the term itself: it must be the term
    # the library adds with router_distillation_coef (checked against the plain reference of separate forwards).
    model = build_xlora("llama", expert_dirs, layerwise_scalings=True).eval()  # no classifier dropout
    ids = input_ids(batch=2, seq=9)
    n = len(find_tuner(model).expert_names)
    captured = {}
    find_tuner(model).xlora_classifier.register_forward_hook(lambda m, a, out: captured.__setitem__("logits", out))
    with torch.no_grad():
        expert_losses = pinned_token_losses(model, ids, torch.eye(n), ids.shape[0]).permute(1, 2, 0)
        model(input_ids=ids)
        got = distillation(captured["logits"], expert_losses, temperature=0.7, softmax_temperature=1.0)
    want = distillation_reference(model, ids, ids, temperature=0.7)
    torch.testing.assert_close(got.item(), want, rtol=1e-5, atol=1e-6)


def test_multi_layer_gate_reads_the_concatenated_layer_outputs(expert_dirs):
    model = build_xlora("llama", expert_dirs, scaling_pass_layers=2, layerwise_scalings=True).eval()
    classifier = features.install(model, (1,))
    tuner = find_tuner(model)
    ids = input_ids(batch=2, seq=6)
    with torch.no_grad():
        model(input_ids=ids)
        got = tuner.get_latest_scalings()
        # Reference: the plain base model's decoder-layer outputs (scaling_pass_value 0: the scaling pass is the base).
        base = tiny_llama()
        outputs = {}
        for i, layer in enumerate(base.model.layers):
            layer.register_forward_hook(
                lambda m, a, out, i=i: outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out)
            )
        base(input_ids=ids)
        logits = classifier.inner(torch.cat([outputs[0], outputs[1]], dim=-1))
    torch.testing.assert_close(got, gate(logits))
    assert classifier.inner.layers[0].in_features == 2 * tuner.xlora_config.hidden_size


def test_each_ablation_variant_changes_one_choice():
    by_label = V.all_variants()
    fields = ("steps", "lr", "distillation", "temperature", "extra_layers")

    def changed(a, b):
        keys = {k for k in fields if getattr(a, k) != getattr(b, k)}
        opts = set(a.options) | set(b.options)
        # An option left at the config's default is the same choice as that option absent.
        return keys | {k for k in opts if a.options.get(k, V.BASELINE[k]) != b.options.get(k, V.BASELINE[k])}

    for choice, change in V.RECIPE_CHOICES.items():
        expected = {k for k in change if k != "options"} | set(change.get("options", {}))
        assert changed(by_label[f"defaults + {choice}"], V.DEFAULTS) == expected
        assert changed(by_label[f"recipe - {choice}"], V.RECIPE) == expected
    assert changed(V.DEFAULTS, V.RECIPE) == set().union(
        *({k for k in c if k != "options"} | set(c.get("options", {})) for c in V.RECIPE_CHOICES.values())
    )


def test_corpus_has_sixteen_documented_domains_and_a_stable_split():
    assert len(corpora.DOMAINS) >= 16
    assert set(corpora.ROUTING_SUBSET) <= set(corpora.DOMAINS) and len(corpora.ROUTING_SUBSET) >= 6
    for domain in corpora.DOMAINS.values():
        assert domain.source and domain.package and domain.licence
    names = [(f"doc{i}", f"text {i}") for i in range(200)]
    train, held = corpora.split(names)
    assert len(train) + len(held) == 200 and not set(train) & set(held)
    assert 20 < len(held) < 60  # about one in five
    assert corpora.split(names) == (train, held)


@pytest.mark.skipif(not Path("/usr/share/common-licenses").is_dir(), reason="needs Debian's base-files")
def test_corpus_reads_a_domain_deterministically():
    first = corpora.read_domains(["licences"], max_chars=500, max_docs=20)
    assert first == corpora.read_domains(["licences"], max_chars=500, max_docs=20)
    train, held = first["licences"]
    assert train and held and all(len(t) <= 500 for t in train + held)
    with pytest.raises(corpora.DataError, match="Unknown domain"):
        corpora.read_domains(["shakespeare"])


@pytest.mark.skipif(not Path("/usr/share/common-licenses").is_dir(), reason="needs Debian's text files")
def _tiny_run(tmp_path, *args):
    """`python -m benchmarks.routing --tiny ARGS` into tmp_path (torch's thread count restored): the payload and the
    written file, whose provenance must be complete."""
    threads = torch.get_num_threads()
    out = tmp_path / "routing-smoke.json"
    try:
        payload = main(["--tiny", *args, "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert check_result(data) == []
    return payload, data


def test_tiny_run_writes_a_result_file(tmp_path):
    domains = ["licences", "locales", "cmake"]
    payload, data = _tiny_run(tmp_path, "--variants", V.DEFAULTS_LABEL, "--seeds", "0", "1", "--domains", *domains)
    for rep in [*data["per_seed"].values(), data["pooled"]]:
        table = rep["table"]
        assert {"base model", "segment oracle", "Arrow top-1", "PEFT built-in X-LoRA", V.DEFAULTS_LABEL} <= set(table)
        assert set(rep["columns"]) == set(table[V.DEFAULTS_LABEL])
        assert all(abs(g) < 1e-9 for g in rep["gaps"]["segment oracle"].values())
        assert all(line.startswith(("PASS ", "FAIL ")) for line in rep["targets"][V.DEFAULTS_LABEL])
    assert payload["seeds"] == [0, 1]


def _tiny_bench(cache, domains=("licences", "locales", "cmake")):
    from benchmarks.routing.bench import TINY, RoutingBench

    bench = RoutingBench(TINY, cache, list(domains), seed=0, quiet=True, log=lambda *a: None)
    bench.prepare()
    return bench


@pytest.mark.skipif(not Path("/usr/share/common-licenses").is_dir(), reason="needs Debian's text files")
def test_distillation_targets_of_a_longer_training_extend_a_shorter_ones(tmp_path):
    # The gate batches are one stream per seed: targets for 50 steps computed from a cached 30-step prefix must be
    # those computed from scratch, and 30 steps sliced from a cached 50 must be the first 30.
    bench = _tiny_bench(tmp_path)
    first = bench.expert_targets(30)
    extended = bench.expert_targets(50)
    for steps in (30, 50):
        bench._targets_file(steps).unlink()
    fresh = bench.expert_targets(50)
    assert len(extended) == len(fresh) == 50
    for got, want in zip(extended, fresh):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(first, fresh[:30]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    bench._targets_file(50).rename(bench._targets_file(100))
    sliced = bench.expert_targets(30)
    assert len(sliced) == 30 and all(torch.equal(a, b) for a, b in zip(sliced, fresh[:30]))


def test_gates_are_built_from_the_benchmark_baseline_not_the_config_defaults(tmp_path):
    # Every field of BASELINE is passed to XLoraConfig explicitly, so a changed config default changes no variant's
    # gate (nor makes a cached gate stand for another one): the cache key holds only the variant's own options.
    bench = _tiny_bench(tmp_path, ("licences", "cmake"))
    for v in V.all_variants().values():
        options = bench.gate_options(v)
        for name, value in V.BASELINE.items():
            want = v.options.get(name, value)
            if name == "scaling_pass_layers" and want is not None:
                want = bench.layer(want)
            assert options[name] == want, (v.label, name)
    config = find_tuner(bench.build_gate(V.DEFAULTS)).xlora_config
    assert {name: getattr(config, name) for name in V.BASELINE} == V.BASELINE


def test_demo_domains_run_uses_the_demo_text_and_can_skip_the_builtin(tmp_path):
    _, data = _tiny_run(tmp_path, "--demo-domains", "--no-builtin", "--variants", V.DEFAULTS_LABEL)
    assert list(data["domains"]) == ["prose", "arithmetic", "shouting"]
    assert all(entry["demo"] for entry in data["domains"].values())
    table = data["per_seed"]["0"]["table"]
    assert V.DEFAULTS_LABEL in table and "PEFT built-in X-LoRA" not in table
    assert data["settings"]["eval_segments"] == 3


def test_results_section_is_written_from_the_files_with_a_marker_on_every_number():
    # docs/routing.md's Results section is generated (benchmarks/routing/prose.py, then the tables): a sentence
    # edited by hand is rewritten, and every number the prose prints resolves through its marker.
    from benchmarks.routing import prose, tables

    page = (Path(ROOT) / "docs" / "routing.md").read_text("utf-8")
    assert page.count(prose.START) == 1
    assert tables.render(page) == page
    head, start, generated = page.partition(prose.START)
    edited = head + start + generated.replace("**Status.**", "**Status.** Hand-written.", 1)
    assert edited != page and tables.render(edited) == page
    # check_sources: every marker has a number right before it, and the number is what the file holds.
    assert "<!-- src: " in generated and prose._doc_tables().check_sources(page) == []


def test_the_default_gate_is_the_benchmarks_gate_at_layer_20():
    # docs/routing.md and the CHANGELOG say the default `scaling_pass_layers="auto"` builds, on SmolLM2-135M (30
    # decoder layers), the gate the benchmark measured as `defaults + gate layer 20`: the same layer, and otherwise the
    # benchmark's defaults (`BASELINE`) with that one option.
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_xlora import XLoraConfig
    from peft_xlora.core.building import resolve_scaling_pass

    shape = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=30, num_attention_heads=1)
    config = XLoraConfig(adapters={"a": "x"})
    resolved = resolve_scaling_pass(LlamaForCausalLM(shape), config.scaling_pass_layers, "dual_pass")
    variant = next(v for v in V.ablation() if v.label == "defaults + gate layer 20")
    assert variant.options == {"scaling_pass_layers": resolved} == {"scaling_pass_layers": 20}
    assert not variant.distillation and (variant.steps, variant.lr) == (V.DEFAULTS.steps, V.DEFAULTS.lr)
    # the benchmark's other gate fields are the config's defaults (the distillation term it adds itself: off)
    assert {k: getattr(config, k) for k in V.BASELINE if k != "scaling_pass_layers"} == {
        k: v for k, v in V.BASELINE.items() if k != "scaling_pass_layers"
    }
