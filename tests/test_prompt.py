"""Soft prompts: layouts, placement, embedding, init, the prompt artifact and its base-model
check, and the PEFT format both ways (with PEFT itself loading what we write)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from cpmctl.artifacts import open_artifact
from cpmctl.errors import CpmError
from cpmctl.models import ModelConfig, build_model
from cpmctl.prompt import PLACEHOLDER_ID, SoftPrompt, load_prompt, parse_position
from cpmctl.prompt.artifact import prompt_info, save_prompt
from cpmctl.prompt.peft import from_peft, to_peft
from cpmctl.prompt.soft import PromptLayout, init_ids

TASK = {"name": "test-task"}


def test_positions_parse_and_must_sum_to_the_length():
    assert parse_position("front", 5) == PromptLayout(5, 0, 0)
    assert parse_position("middle", 5) == PromptLayout(0, 5, 0)
    assert parse_position("back", 5) == PromptLayout(0, 0, 5)
    layout = parse_position("33:34:33", 100)
    assert (layout.front, layout.middle, layout.back, layout.spec) == (33, 34, 33, "33:34:33")
    with pytest.raises(CpmError, match="sum to 99, but --length is 100"):
        parse_position("33:33:33", 100)
    with pytest.raises(CpmError, match="--length must be at least 1, got 0"):
        parse_position("front", 0)
    with pytest.raises(CpmError, match="three counts"):
        parse_position("50:50", 100)


def test_place_puts_slots_before_between_and_after_the_parts():
    prompt = SoftPrompt(PromptLayout(2, 1, 1), d_model=4)
    ids, slots = prompt.place([[11, 12], [21]])
    P = PLACEHOLDER_ID
    assert ids == [P, P, 11, 12, P, 21, P]
    assert slots == [0, 1, 4, 6]
    with pytest.raises(CpmError, match="needs two"):
        prompt.place([[11, 12]])
    assert SoftPrompt(PromptLayout(0, 0, 2), 4).place([[5]]) == ([5, P, P], [1, 2])


def test_embed_replaces_the_slot_rows_and_only_the_table_gets_gradients():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="gpt", vocab_size=50, d_model=8, n_heads=2, n_layers=1,
                      max_positions=16)
    model = build_model(cfg).requires_grad_(False)
    prompt = SoftPrompt(PromptLayout(2, 0, 1), cfg.d_model)
    torch.nn.init.normal_(prompt.table)
    ids, slots = prompt.place([[3, 4, 5]])
    embeds = prompt.embed(model, torch.tensor([ids]), [slots])
    assert torch.equal(embeds[0, slots], prompt.table)
    assert torch.equal(embeds[0, 2:5], model.wte.weight[[3, 4, 5]])
    model(inputs_embeds=embeds).sum().backward()
    assert prompt.table.grad is not None and prompt.table.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


class _Tok:
    vocab_size = 40
    special = {"unk": 0, "bos": 1, "eos": 2, "sep": 4, "pad": 5, "mask": 6, "eod": 7}

    def encode(self, text):
        return [10 + (ord(c) % 20) for c in text]


def test_inits_mask_vocab_and_text_repeat_or_cut():
    tok = _Tok()
    assert init_ids("mask", 3, tok, 0) == [6, 6, 6]
    drawn = init_ids("vocab", 50, tok, seed=1)
    assert drawn == init_ids("vocab", 50, tok, seed=1) != init_ids("vocab", 50, tok, seed=2)
    assert not set(drawn) & set(tok.special.values())
    assert init_ids("text:ab", 5, tok, 0) == tok.encode("ababa")
    assert init_ids("text:abcdef", 2, tok, 0) == tok.encode("ab")
    with pytest.raises(CpmError, match="no tokens"):
        init_ids("text:", 2, tok, 0)
    with pytest.raises(CpmError, match="expected mask, vocab or text"):
        init_ids("zeros", 2, tok, 0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two different tiny GPT model artifacts (no tokenizer needed here)."""
    from cpmctl.models.artifact import save_model

    folder = tmp_path_factory.mktemp("prompt")
    cfg = ModelConfig(arch="gpt", vocab_size=64, d_model=16, n_heads=2, n_layers=2,
                      max_positions=32, init_std=0.1)
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(save_model(folder / f"gpt{seed}", build_model(cfg), cfg, None, meta={},
                              command=["test"]))
    return out


def _saved_prompt(models, tmp_path, layout=PromptLayout(4, 0, 0), name="p"):
    base = open_artifact(models[0])
    prompt = SoftPrompt(layout, 16)
    torch.manual_seed(3)
    torch.nn.init.normal_(prompt.table)
    info = prompt_info(prompt, init="vocab", task=TASK, base=base, d_model=16)
    return prompt, save_prompt(tmp_path / name, prompt, info, command=["test"])


def test_prompt_artifact_round_trip_and_refuses_another_base(models, tmp_path):
    prompt, path = _saved_prompt(models, tmp_path, PromptLayout(1, 2, 1))
    artifact = open_artifact(path, "prompt")
    assert sorted(artifact.files) == ["prompt.json", "prompt.safetensors"]
    assert artifact.files["prompt.safetensors"]["bytes"] < 2048
    info = json.loads((path / "prompt.json").read_text())
    assert info["position"] == {"front": 1, "middle": 2, "back": 1, "spec": "1:2:1"}
    assert info["init"] == "vocab" and info["task"] == TASK
    loaded = load_prompt(path, open_artifact(models[0]).digest)
    assert torch.equal(loaded.table, prompt.table) and loaded.layout == prompt.layout
    assert not loaded.table.requires_grad
    other = open_artifact(models[1]).digest
    with pytest.raises(CpmError) as exc:
        load_prompt(path, other)
    assert info["base_model"]["digest"] in str(exc.value) and other in str(exc.value)
    with pytest.raises(CpmError, match="is a model; --prompt needs a prompt"):
        load_prompt(models[0], None)


def test_a_prompt_file_that_disagrees_with_prompt_json_is_refused(models, tmp_path):
    _, path = _saved_prompt(models, tmp_path)
    save_file({"prompt": torch.zeros(3, 16)}, str(path / "prompt.safetensors"))
    with pytest.raises(CpmError, match=r"the prompt is \[3, 16\], prompt.json says \[4, 16\]"):
        load_prompt(path, None)
    save_file({"prompt": torch.full((4, 16), float("nan"))}, str(path / "prompt.safetensors"))
    with pytest.raises(CpmError, match="non-finite"):
        load_prompt(path, None)


def test_peft_export_comes_back_and_keeps_its_base(models, tmp_path):
    """The adapter's files and their way back (PEFT itself loads them in
    test_prompt_tune.py's round trip)."""
    from safetensors import safe_open

    prompt, path = _saved_prompt(models, tmp_path)
    out = to_peft(path, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 4
    assert config["token_dim"] == 16
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert list(f.keys()) == ["prompt_embeddings"]
        assert torch.equal(f.get_tensor("prompt_embeddings"), prompt.table.detach())
    back = from_peft(out, models[0], TASK, tmp_path / "back")
    assert torch.equal(load_prompt(back, open_artifact(models[0]).digest).table, prompt.table)
    with pytest.raises(CpmError, match="not this --model"):
        from_peft(out, models[1], TASK, tmp_path / "back2")
    with pytest.raises(CpmError, match="already exists"):
        to_peft(path, out)


def test_peft_export_refuses_a_prompt_not_in_front(models, tmp_path):
    _, path = _saved_prompt(models, tmp_path, PromptLayout(2, 0, 2))
    with pytest.raises(CpmError, match="PEFT only prepends"):
        to_peft(path, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("layout", [PromptLayout(3, 0, 0), PromptLayout(1, 1, 1)])
@pytest.mark.parametrize("recompute", [False, True])
def test_shared_context_training_gives_the_flat_rows_losses_and_gradients(layout, recompute):
    """Prompt tuning on a gpt choice rule scores each example's context once for its K
    candidates (a PackedBatch); the log-likelihoods and the prompt's gradient equal those of
    one row per candidate, with activations recomputed too."""
    from cpmctl.bench.packing import packed_batch
    from cpmctl.bench.scoring import Row, candidate_losses, flat_batch
    from cpmctl.models import checkpoint_activations

    torch.manual_seed(0)
    cfg = ModelConfig(arch="gpt", vocab_size=60, d_model=16, n_heads=2, n_layers=2,
                      max_positions=32)
    model = build_model(cfg).requires_grad_(False)
    if recompute:
        checkpoint_activations(model)
    prompt = SoftPrompt(layout, cfg.d_model)
    torch.nn.init.normal_(prompt.table)
    groups = []
    for parts, continuations in (([[11, 12, 13], [14]], [[20], [21, 22]]),
                                 ([[15], [16, 17]], [[23, 24, 25], [26], [27]])):
        ids, slots = prompt.place(parts)
        groups.append([Row(ids, c, slots) for c in continuations])
    results = []
    for batch in (flat_batch([r for g in groups for r in g], "gpt", 5, 5),
                  packed_batch(groups, 5)):
        prompt.table.grad = None
        logprob, counts = candidate_losses(model, batch, prompt)
        (logprob / counts).sum().backward()
        results.append((logprob.detach(), counts, prompt.table.grad.clone()))
    (flat_lp, flat_n, flat_grad), (shared_lp, shared_n, shared_grad) = results
    assert torch.equal(flat_n, shared_n)
    assert torch.allclose(flat_lp, shared_lp, atol=1e-5)
    assert flat_grad.abs().sum() > 0
    assert torch.allclose(flat_grad, shared_grad, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("layout", [PromptLayout(4, 0, 0), PromptLayout(1, 2, 1)])
def test_a_long_example_loses_its_text_and_keeps_every_prompt_slot(layout):
    """fit_group cuts the example's first tokens around the slots, so the prompt stays whole
    and in place, and the context still ends with the template."""
    from cpmctl.bench.scoring import Row, fit_group

    prompt = SoftPrompt(layout, d_model=4)
    text, template = list(range(100, 140)), [7, 8]
    ids, slots = prompt.place([text, template])
    rows = [Row(ids, [20], slots), Row(ids, [21, 22], slots)]
    fitted, cut = fit_group(rows, max_positions=16)
    assert cut
    for row in fitted:
        assert len(row.context) + len(row.continuation) <= 17
        assert [row.context[s] for s in row.slots] == [PLACEHOLDER_ID] * layout.length
        assert row.context[-2 - layout.back:] == template + [PLACEHOLDER_ID] * layout.back
        kept = [t for i, t in enumerate(row.context) if i not in set(row.slots)][:-2]
        assert kept == text[-len(kept):] and len(kept) > 0
    assert fitted[0].context == fitted[1].context
    assert fitted[1].continuation == [21, 22]  # cut for the longest: nothing of it goes
    assert len(fitted[1].context) == 17 - 2
