"""`somoe export`: every FFN kind on both backbones loads in transformers and computes what somoe
computes (logits within 1e-4 in fp32, the same greedy tokens), with transformers alone, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_helpers import KINDS
from somoe.cli import main
from somoe.generate.sampling import GenerationConfig, generate_ids
from somoe.evaluate.runs import load_run

import transformers  # the [hf] extra: installed by run.sh, so these tests run (never skip) in CI
SRC = Path(__file__).resolve().parents[2] / "src"
PROMPTS = ["Once upon a time", "The little dog saw a big red ball and"]


def fixed_batch(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (3, 32), generator=torch.Generator().manual_seed(0))


def load_hf(exported):
    model = transformers.AutoModelForCausalLM.from_pretrained(exported.out, trust_remote_code=exported.trust_remote_code)
    return model.eval()


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_uses_the_exact_class_and_its_logits_match_somoe(kind, hf_runs, exports):
    exported, expected_class = exports[kind], KINDS[kind][1]
    config = json.loads((exported.out / "config.json").read_text())
    assert exported.native == expected_class
    assert config["architectures"] == [expected_class or "SomoeForCausalLM"]
    assert (exported.out / "modeling_somoe.py").is_file() == (expected_class is None)
    loaded = load_run(hf_runs[kind], device="cpu")
    model = load_hf(exported)
    ids = fixed_batch(loaded.cfg.model.vocab_size)
    with torch.no_grad():
        ours, theirs = loaded.model(ids).logits, model(ids).logits
    assert ours.std() > 0.5  # a comparison of real logits, not of near-zero ones
    if kind.endswith("bf16"):  # bf16 experts: both sides round in bf16, in different orders
        assert model.transformer.blocks[0].ffn.expert_w1.dtype == torch.bfloat16
        assert (ours - theirs).abs().max() < 0.1
    else:
        assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("kind", [k for k in KINDS if not k.endswith("bf16")])
def test_greedy_generate_gives_somoe_generates_tokens(kind, hf_runs, exports):
    """One prompt, then a left-padded batch of two: 40 greedy tokens each, KV-cached on both sides."""
    loaded = load_run(hf_runs[kind], device="cpu")
    exported = exports[kind]
    model = load_hf(exported)
    tok = transformers.AutoTokenizer.from_pretrained(exported.out, trust_remote_code=exported.trust_remote_code)
    prompt_ids = [[loaded.tokenizer.eos_id] + loaded.tokenizer.encode(p) for p in PROMPTS]
    greedy = GenerationConfig(max_new_tokens=40, greedy=True, stop_at_eos=False)
    for n in (1, 2):  # separately: with expert capacity, a token's experts depend on the whole batch
        ours = generate_ids(loaded.model, prompt_ids[:n], greedy, loaded.tokenizer.eos_id, loaded.tokenizer.pad_id)
        enc = tok(PROMPTS[:n], return_tensors="pt", padding=True)
        assert enc["input_ids"][-1].tolist() == prompt_ids[n - 1]  # [EOS] + the prompt, left-padded
        out = model.generate(**enc, max_new_tokens=40, do_sample=False, eos_token_id=None)
        assert out.shape[1] == enc["input_ids"].shape[1] + 40
        assert out[:, enc["input_ids"].shape[1]:].tolist() == ours


@pytest.mark.parametrize("kind", ["gpt2_moe", "gpt2_some"])  # learned positions (RoPE is shift-invariant)
def test_remote_code_forward_reads_positions_from_a_left_padded_mask(kind, exports):
    """Without position_ids, a left-padded row computes what the same tokens compute unpadded."""
    model = load_hf(exports[kind])
    ids = fixed_batch(model.config.vocab_size)[:1, :20]
    padded = torch.cat([torch.full((1, 5), 1), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 20, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone, with_pad = model(ids).logits, model(padded, attention_mask=mask).logits[:, 5:]
    assert (alone - with_pad).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["gpt2_dense", "smollm_moe", "gpt2_some"])
def test_text_generation_pipeline_runs(kind, exports):
    exported = exports[kind]
    pipe = transformers.pipeline("text-generation", model=str(exported.out),
                                 trust_remote_code=exported.trust_remote_code)
    text = pipe("Once upon a time", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("Once upon a time") and len(text) > len("Once upon a time")


ISOLATED = r"""
import json, sys
from pathlib import Path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(sys.argv[1])]
try:
    import somoe
    sys.exit("somoe is importable")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {}
for folder, remote, ids in json.loads(sys.argv[2]):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
    with torch.no_grad():
        logits = model(torch.tensor(ids)).logits
    out[folder] = {"logits": logits.tolist(), "prompt": tok("Once upon a time")["input_ids"]}
out["modules"] = sorted(m.split(".")[0] for m in sys.modules)
print(json.dumps(out))
"""


def test_every_export_loads_with_transformers_alone_offline(hf_runs, exports, tmp_path):
    """One subprocess without somoe on its path (``python -I``, somoe's src/ removed), offline."""
    loaded = {kind: load_run(hf_runs[kind], device="cpu") for kind in KINDS}
    batches = {kind: fixed_batch(run.cfg.model.vocab_size) for kind, run in loaded.items()}
    jobs = [(str(exports[k].out), exports[k].trust_remote_code, batches[k].tolist()) for k in KINDS]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-I", "-c", ISOLATED, str(SRC), json.dumps(jobs)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "somoe" not in result["modules"]
    for kind in KINDS:
        got = result[str(exports[kind].out)]
        with torch.no_grad():
            ours = loaded[kind].model(batches[kind]).logits
        assert (ours - torch.tensor(got["logits"])).abs().max() < (0.1 if kind.endswith("bf16") else 1e-4), kind
        assert got["prompt"] == [2] + loaded[kind].tokenizer.encode("Once upon a time")


def test_tampered_expert_fails_the_hash_check_on_load(exports, tmp_path):
    import shutil

    folder = tmp_path / "tampered"
    shutil.copytree(exports["gpt2_some"].out, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["transformer.blocks.1.ffn.expert_w2"][3, 5, 7] += 1e-3
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Exception, match="layer 1: frozen expert weights hash to"):
        transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def test_procedural_experts_are_regenerated_not_stored_and_checked_on_load(hf_runs, exports, tmp_path):
    """A procedural export holds no expert weight; its remote code regenerates every expert as somoe does, and
    a digest that does not match (another generator) refuses the load."""
    import shutil

    exported = exports["gpt2_some_product"]
    assert not any(".expert_" in k for k in load_file(str(exported.out / "model.safetensors")))
    model = load_hf(exported)
    ours = load_run(hf_runs["gpt2_some_product"], device="cpu").model.blocks[1].ffn.procedural
    for e in (0, 5, 15):
        for w_hf, w_ours in zip(model.transformer.blocks[1].ffn.procedural.weights(e), ours.expert_weights(e)):
            assert torch.equal(w_hf, w_ours)
    folder = tmp_path / "other-generator"
    shutil.copytree(exported.out, folder)
    config = json.loads((folder / "config.json").read_text())
    config["some"]["procedural_digest"]["1"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="layer 1: procedural experts regenerate to digest"):
        transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def test_model_card_reports_the_runs_figures(hf_runs, exports):
    loaded = load_run(hf_runs["gpt2_some"], device="cpu")
    card = (exports["gpt2_some"].out / "README.md").read_text()
    records = [json.loads(line) for line in (hf_runs["gpt2_some"] / "metrics.jsonl").read_text().splitlines()]
    bpb = [r for r in records if "val_bpb" in r][-1]
    assert f"{bpb['val_bpb']:.4f} (step {bpb['step']})" in card
    counts = loaded.model.param_counts()
    # 2 layers of 8 frozen experts with biases (32 wide, d_model 32), 2 of 8 active per token
    frozen = 2 * 8 * (2 * 32 * 32 + 32 + 32)
    active = counts["total"] - frozen * 6 // 8
    assert f"{counts['total']:,} / {counts['trainable']:,} / {active:,}" in card
    assert "license: mit" in card and "seed 000" in card and "trust_remote_code=True" in card
    generation = json.loads((exports["gpt2_some"].out / "generation_config.json").read_text())
    settings = json.loads((exports["gpt2_some"].out / "tokenizer_config.json").read_text())
    assert generation["eos_token_id"] == generation["bos_token_id"] == 2 and generation["pad_token_id"] == 1
    assert (settings["bos_token"], settings["eos_token"], settings["pad_token"]) == ("[EOS]", "[EOS]", "[PAD]")


def test_export_command_refuses_bad_input_and_writes_nothing(hf_runs, tmp_path, capsys):
    run = hf_runs["gpt2_dense"]
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "no-run"), str(out)]) == 2
    assert "has no checkpoints" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(run), str(out), "--step", "99"]) == 2
    assert "no checkpoint for step 99" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(run), str(out), "--step", "1"]) == 0
    assert "`step-00000001`" in (out / "README.md").read_text()
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    assert main(["export", str(run), str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before
    assert main(["export", str(run), str(out), "--force"]) == 0
    assert "`step-00000002`" in (out / "README.md").read_text()
    assert not (tmp_path / "out.tmp").exists()
